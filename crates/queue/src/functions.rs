//! The Redis functions producers call. Tenants' users may call functions but not `EVAL`
//! (a script of their own could stall Redis for every tenant), so what a producer needs in
//! one round trip lives in a library that consumers (and producers whose user may) load.

use crate::QueueError;

/// Verdict-cache lookup and enqueue in one step. KEYS: verdict list, task stream (the keys a
/// tenant's user owns). ARGV: cache key ('' for none), encoded task, verdict TTL, the stream
/// field of the task. The cache key is read, never written, so it is not declared: a tenant's
/// user may only read it. A cached verdict is pushed to the task's verdict list, where the
/// `BLPOP` sent right behind this call finds it; 1 = cached.
pub(crate) const SUBMIT: &str = "vs_submit_1";

/// The library's and the functions' names carry their version: a library of another version
/// under another name can stay loaded beside this one while a rollout runs.
pub(crate) const LIBRARY: &str = "virus_scanner_1";

const CODE: &str = r"#!lua name=virus_scanner_1
redis.register_function('vs_submit_1', function(keys, args)
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
";

/// Loads (or replaces with the same code) the library.
pub(crate) async fn load<C: redis::aio::ConnectionLike>(conn: &mut C) -> Result<(), QueueError> {
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(CODE)
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
