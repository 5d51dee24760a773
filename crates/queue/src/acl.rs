//! The Redis ACL users of a shared queue, as `ACL SETUSER` rules: one user per tenant, one for
//! the consumers. The operator applies them to the bundled Redis; for an external Redis they
//! are the lines to apply by hand (`virus-scan-operator redis-acl`).
//!
//! A tenant's user may submit tasks to its own streams (only through the `vs_submit` function
//! or `XADD`), read cache entries and the database version, wait for and write its own verdict
//! lists and store its own bodies. It may not write the cache or the database version, read
//! any stream (no `XRANGE`, `XREAD`, `XREADGROUP`, `XGROUP`), touch another tenant's keys,
//! run scripts of its own (`EVAL`: a loop in one would stall Redis for every tenant), load
//! functions, or run any admin command. Redis checks these rules inside functions too, by the
//! keys each call touches; Redis 7 selectors tie each command to the keys it may touch, so a
//! tenant cannot, say, turn its task stream into a hash and break the consumers' reads.

use crate::Keys;

/// The username of a tenant's Redis user.
pub fn tenant_user(tenant: &str) -> String {
    format!("vs-tenant-{tenant}")
}

/// Commands every client needs to connect and stay connected.
const CONNECTION: &[&str] = &[
    "+ping",
    "+hello",
    "+auth",
    "+select",
    "+client|setname",
    "+client|setinfo",
    "+multi",
    "+exec",
    "+discard",
];

/// The rules of a tenant's user, after `reset` (no password, no keys, no commands). The
/// password is added by the caller (`>password` or `#sha256`).
pub fn tenant_rules(prefix: &str, tenant: &str) -> Vec<String> {
    let keys = Keys::new(prefix);
    let p = keys.prefix();
    let mut rules: Vec<String> = vec!["on".into(), "resetchannels".into(), "-@all".into()];
    rules.extend(CONNECTION.iter().map(|c| (*c).to_owned()));
    // The submit function declares the verdict list and the stream; Redis wants full access
    // to the keys a function declares.
    rules.push("+fcall".into());
    rules.push(format!("~{p}:verdict:{tenant}:*"));
    rules.push(format!("~{p}:tasks:{tenant}:*"));
    rules.push(format!("(+xadd ~{p}:tasks:{tenant}:*)"));
    rules.push(format!("(+blpop +rpush +expire ~{p}:verdict:{tenant}:*)"));
    rules.push(format!(
        "(+hset +expire +pexpire +unlink +del ~{p}:body:{tenant}:*)"
    ));
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
        format!("~{legacy_queue}:*"),
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
