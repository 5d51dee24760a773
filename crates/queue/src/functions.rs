//! The Redis functions producers call. Tenants' users may call functions but not `EVAL`
//! (a script of their own could stall Redis for every tenant), so what a producer needs in
//! one round trip lives in a library that consumers (and producers whose user may) load.

use crate::QueueError;

/// Verdict-cache lookup and enqueue in one step. KEYS: verdict list, task stream (the keys a
/// tenant's user owns). ARGV: cache key ('' for none), encoded task, verdict TTL, the stream
/// field of the task. A task over [`MAX_TASK_BYTES`] is refused. The cache key is read, never written, so it is not declared: a tenant's
/// user may only read it. A cached verdict is pushed to the task's verdict list, where the
/// `BLPOP` sent right behind this call finds it; 1 = cached.
pub(crate) const SUBMIT: &str = "vs_submit_1";

/// The library's and the functions' names carry their version: a library of another version
/// under another name can stay loaded beside this one while a rollout runs.
pub(crate) const LIBRARY: &str = "virus_scanner_1";

const CODE: &str = r"#!lua name=virus_scanner_1
local MAX_TASK_BYTES = @MAX_TASK_BYTES@
local MAX_CHUNKS = @MAX_CHUNKS@
local MAX_CHUNK_BYTES = @MAX_CHUNK_BYTES@
redis.register_function('vs_submit_1', function(keys, args)
  if #args[2] > MAX_TASK_BYTES then
    return redis.error_reply('task of ' .. #args[2] .. ' bytes, more than ' .. MAX_TASK_BYTES)
  end
  if args[1] ~= '' then
    local cached = redis.call('GET', args[1])
    if cached then
      redis.call('RPUSH', keys[1], cached)
      redis.call('EXPIRE', keys[1], args[3])
      return 1
    end
  end
  redis.call('XADD', keys[2], '*', args[4], args[2])
  return 0
end)
redis.register_function('vs_store_chunk_1', function(keys, args)
  local index = tonumber(args[1])
  if index == nil or index < 0 or index >= MAX_CHUNKS or index ~= math.floor(index) then
    return redis.error_reply('chunk index ' .. args[1] .. ' out of range')
  end
  if #args[2] > MAX_CHUNK_BYTES then
    return redis.error_reply('chunk of ' .. #args[2] .. ' bytes, more than ' .. MAX_CHUNK_BYTES)
  end
  redis.call('HSET', keys[1], index, args[2])
  redis.call('PEXPIRE', keys[1], args[3])
  return 1
end)
";

/// One chunk of a body sent through Redis, with the hash's TTL, in one step. KEYS: the body's
/// hash (the tenant's own). ARGV: chunk index (below [`MAX_CHUNKS`]), chunk (at most
/// [`crate::MAX_CHUNK_BYTES`]), TTL in ms.
pub(crate) const STORE_CHUNK: &str = "vs_store_chunk_1";

/// The largest encoded task the submit function queues: an inline body is at most the spill
/// threshold (`SCAN_FILE_THRESHOLD_MB`, at most 64 MiB), plus room for the task's fields.
pub const MAX_TASK_BYTES: usize = (64 << 20) + (1 << 20);

/// The most chunks of one body sent through Redis: 64 GiB in 2 MiB chunks (`MAX_BODY_MB`).
pub const MAX_CHUNKS: u32 = 32768;

/// The library with its limits written in: what a caller passes cannot raise them.
fn code() -> String {
    CODE.replace("@MAX_TASK_BYTES@", &MAX_TASK_BYTES.to_string())
        .replace("@MAX_CHUNKS@", &MAX_CHUNKS.to_string())
        .replace("@MAX_CHUNK_BYTES@", &crate::MAX_CHUNK_BYTES.to_string())
}

/// Loads (or replaces with the same code) the library.
pub(crate) async fn load<C: redis::aio::ConnectionLike>(conn: &mut C) -> Result<(), QueueError> {
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(code())
        .query_async(conn)
        .await?;
    Ok(())
}

/// Loads the library where this user may; a user that may not (a tenant's) relies on the
/// consumers having loaded it.
pub(crate) async fn load_if_allowed<C: redis::aio::ConnectionLike>(
    conn: &mut C,
) -> Result<(), QueueError> {
    match load(conn).await {
        Err(QueueError::Redis(e)) if e.code() == Some("NOPERM") => Ok(()),
        other => other,
    }
}

/// A call to a function that Redis does not know (a Redis restarted without persistence
/// before any consumer reloaded it).
pub(crate) fn is_missing_function(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}
