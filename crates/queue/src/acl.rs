//! The Redis ACL users of a shared queue, as `ACL SETUSER` rules: one user per tenant, one for
//! the consumers. The operator applies them to the bundled Redis; for an external Redis they
//! are the lines to apply by hand (`virus-scan-operator redis-acl`).
//!
//! A tenant's user may submit tasks to its own streams (through the `vs_submit` function,
//! or `XADD`), read cache entries and the database version, wait for and write its own verdict
//! lists and store its own bodies. It may not write the cache or the database version, read
//! any stream (no `XRANGE`, `XREAD`, `XREADGROUP`, `XGROUP`), touch another tenant's keys,
//! run scripts of its own (`EVAL`: a loop in one would stall Redis for every tenant), load
//! functions, or run any admin command. Redis checks these rules inside functions too, by the
//! keys each call touches; Redis 7 selectors tie each command to the keys it may touch, so a
//! tenant cannot, say, turn its task stream into a hash and break the consumers' reads.

use crate::{Keys, QueueError};

/// The prefix of every tenant's username, so that the users of tenants that are gone can be
/// told from others.
pub const TENANT_USER_PREFIX: &str = "vs-tenant-";

/// The username of a tenant's Redis user.
pub fn tenant_user(tenant: &str) -> String {
    format!("{TENANT_USER_PREFIX}{tenant}")
}

/// Commands every client needs to connect and stay connected.
/// No `MULTI`/`EXEC` (a transaction of millions of queued commands stalls Redis for every
/// tenant) and no `SELECT` (other databases are memory no consumer ever frees).
const CONNECTION: &[&str] = &["+ping", "+hello", "+auth", "+client|setname"];

/// The rules of a tenant's user, after `reset` (no password, no keys, no commands). The
/// password is added by the caller (`>password` or `#sha256`).
pub fn tenant_rules(prefix: &str, tenant: &str) -> Vec<String> {
    let keys = Keys::new(prefix);
    let p = keys.prefix();
    let mut rules: Vec<String> = vec!["on".into(), "resetchannels".into(), "-@all".into()];
    rules.extend(CONNECTION.iter().map(|c| (*c).to_owned()));
    // The functions declare the verdict list and the stream, or the body's hash; Redis wants
    // full access to the keys a function declares, and checks the commands a function runs
    // against the caller's rules, so the `XADD` and `HSET` the functions run are the
    // tenant's to run directly too. What bounds an entry a tenant writes either way is
    // Redis's own limits (the chart's `proto-max-bulk-len`, `client-query-buffer-limit`) and
    // the consumers' claim script, which drops an entry over `MAX_TASK_BYTES` unread.
    rules.push("+fcall".into());
    rules.push(format!("~{p}:verdict:{tenant}:*"));
    rules.push(format!("~{p}:tasks:{tenant}:*"));
    rules.push(format!("~{p}:body:{tenant}:*"));
    rules.push(format!("(+blpop +rpush +expire ~{p}:verdict:{tenant}:*)"));
    rules.push(format!("(+xadd ~{p}:tasks:{tenant}:*)"));
    rules.push(format!("(+hset +pexpire +unlink ~{p}:body:{tenant}:*)"));
    rules.push(format!("(+get %R~{p}:cache:* %R~{})", keys.db_version));
    rules
}

/// The rules of the consumers' user: every command on the queue's keys and the legacy list,
/// loading the queue's functions, and nothing an administrator would keep for themself.
pub fn consumer_rules(prefix: &str, legacy_queue: &str, legacy_result_prefix: &str) -> Vec<String> {
    let keys = Keys::new(prefix);
    vec![
        "on".into(),
        "resetchannels".into(),
        "+@all".into(),
        "-@admin".into(),
        "-@dangerous".into(),
        "+function|load".into(),
        format!("~{}:*", keys.prefix()),
        format!("~{legacy_queue}"),
        format!("~{{{legacy_queue}}}:*"),
        format!("~{legacy_result_prefix}*"),
    ]
}

/// A rule list as one `ACL SETUSER` line, for documentation and for `redis-cli`.
pub fn setuser_line(user: &str, password_rule: &str, rules: &[String]) -> String {
    let mut line = format!("ACL SETUSER {user} reset {password_rule}");
    for r in rules {
        line.push(' ');
        if r.contains(' ') {
            line.push('"');
            line.push_str(r);
            line.push('"');
        } else {
            line.push_str(r);
        }
    }
    line
}

/// Creates or updates `user` with exactly `rules` and `password` (existing connections stay;
/// they were authenticated with the password they had), in one command.
pub async fn set_user<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    user: &str,
    password: &str,
    rules: &[String],
) -> Result<(), QueueError> {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER").arg(user).arg("reset");
    cmd.arg(format!(">{password}"));
    for r in rules {
        cmd.arg(r);
    }
    let _: () = cmd.query_async(conn).await?;
    Ok(())
}

/// Gives `tenant` its user with `password` and registers it with the consumers.
pub async fn provision_tenant<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    tenant: &str,
    password: &str,
) -> Result<(), QueueError> {
    // `_` starts the tenants of the platform's own (the seed's bridge): never a tenant's user.
    virus_scanner_protocol::task::validate_tenant_key(tenant)
        .ok()
        .filter(|_| !tenant.is_empty() && !tenant.starts_with('_'))
        .ok_or_else(|| QueueError::Config(format!("{tenant:?} cannot name a tenant's keys")))?;
    set_user(
        conn,
        &tenant_user(tenant),
        password,
        &tenant_rules(prefix, tenant),
    )
    .await?;
    let _: i64 = redis::cmd("SADD")
        .arg(Keys::new(prefix).tenants)
        .arg(tenant)
        .query_async(conn)
        .await?;
    Ok(())
}

/// Removes a tenant's user (and disconnects its clients) and stops the consumers polling its
/// streams. Tasks still queued for it get no verdict; its producers fail closed.
pub async fn remove_tenant<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    tenant: &str,
) -> Result<(), QueueError> {
    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(tenant_user(tenant))
        .query_async(conn)
        .await?;
    let _: i64 = redis::cmd("SREM")
        .arg(Keys::new(prefix).tenants)
        .arg(tenant)
        .query_async(conn)
        .await?;
    Ok(())
}

/// The tenants that have a user now.
pub async fn provisioned_tenants<C: redis::aio::ConnectionLike>(
    conn: &mut C,
) -> Result<Vec<String>, QueueError> {
    let users: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(conn).await?;
    Ok(users
        .into_iter()
        .filter_map(|u| u.strip_prefix(TENANT_USER_PREFIX).map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_is_granted_only_keys_with_its_own_name() {
        let rules = tenant_rules("vs", "team-a").join(" ");
        for key_rule in rules.split(' ').filter(|r| r.contains('~')) {
            let pattern = key_rule.trim_start_matches(['(', '%', 'R', 'W', '~']);
            assert!(
                pattern.contains(":team-a:")
                    || pattern.starts_with("{vs}:cache:")
                    || pattern == "{vs}:db-version)",
                "{key_rule}"
            );
        }
        assert!(!rules.contains("+eval"));
        assert!(!rules.contains("+@"));
        assert!(!rules.contains("+xread"));
    }

    #[test]
    fn a_line_quotes_selectors() {
        let line = setuser_line("u", ">pw", &["on".into(), "(+get ~k)".into()]);
        assert_eq!(line, "ACL SETUSER u reset >pw on \"(+get ~k)\"");
    }
}
