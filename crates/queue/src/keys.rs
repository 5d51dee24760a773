use virus_scanner_protocol::task::Priority;

/// The tenant of producers that name none.
pub const DEFAULT_TENANT: &str = "default";

/// The tenant the consumers' bridge queues the seed's legacy tasks as. No namespace and no
/// tenant's Redis user can have this name (namespaces have no `_`, and the operator refuses
/// it), and only tasks from its streams are answered in the seed's format.
pub const LEGACY_TENANT: &str = "_seed";

/// Redis key names. All carry the hash tag `{prefix}` so that they live in one cluster slot.
///
/// Everything a tenant's producer touches carries the tenant right after its kind, so that a
/// per-tenant ACL user can be granted `{prefix}:tasks:<tenant>:*`, `{prefix}:verdict:<tenant>:*`
/// and `{prefix}:body:<tenant>:*` alone ([`crate::acl`]). Tenants are checked by
/// `validate_tenant_key`: no `:` and no glob character can appear in them.
#[derive(Debug, Clone)]
pub struct Keys {
    tag: String,
    pub db_version: String,
    /// The set of tenants whose streams the consumers read. Written by the operator (or by a
    /// producer whose user may), read by the consumers.
    pub tenants: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let tag = format!("{{{prefix}}}");
        Keys {
            db_version: format!("{tag}:db-version"),
            tenants: format!("{tag}:tenants"),
            tag,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.tag
    }

    /// The stream a tenant's tasks of one priority are queued on.
    pub fn stream(&self, tenant: &str, priority: Priority) -> String {
        let level = match priority {
            Priority::High => "high",
            Priority::Normal => "normal",
        };
        format!("{}:tasks:{tenant}:{level}", self.tag)
    }

    /// The tenant and priority of a stream named by [`Keys::stream`].
    pub fn parse_stream<'a>(&self, stream: &'a str) -> Option<(&'a str, Priority)> {
        let rest = stream.strip_prefix(&self.tag)?.strip_prefix(":tasks:")?;
        let (tenant, level) = rest.rsplit_once(':')?;
        let priority = match level {
            "high" => Priority::High,
            "normal" => Priority::Normal,
            _ => return None,
        };
        Some((tenant, priority))
    }

    /// Where the verdict of a tenant's task is pushed.
    pub fn verdict(&self, tenant: &str, task_id: &str) -> String {
        format!("{}:verdict:{tenant}:{task_id}", self.tag)
    }

    /// Never written: a tenant's producers park a `BLPOP` on it to notice a lost connection at
    /// once. Task ids are hex, so it cannot be a task's verdict list.
    pub fn canary(&self, tenant: &str) -> String {
        self.verdict(tenant, "connection-canary")
    }

    pub fn cache(&self, db_version: &str, sha256: &[u8]) -> String {
        format!("{}:cache:{db_version}:{}", self.tag, hex::encode(sha256))
    }

    /// The hash that holds the chunks of a body sent through Redis. Derived from the task's
    /// tenant (the stream it came from) and id, never named by the task: a task cannot make a
    /// consumer read or delete another key.
    pub fn body(&self, tenant: &str, task_id: &str) -> String {
        format!("{}:body:{tenant}:{task_id}", self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("vs");
        for key in [
            k.db_version.clone(),
            k.tenants.clone(),
            k.stream("a", Priority::High),
            k.canary("a"),
            k.verdict("a", "t1"),
            k.cache("27000", &[0xab; 32]),
            k.body("tenant-a", "t1"),
        ] {
            assert!(key.starts_with("{vs}:"), "{key}");
        }
        assert_eq!(k.cache("1", &[0xab, 0x01]), "{vs}:cache:1:ab01");
        assert_eq!(k.body("tenant-a", "t1"), "{vs}:body:tenant-a:t1");
        assert_eq!(k.verdict("tenant-a", "t1"), "{vs}:verdict:tenant-a:t1");
    }

    #[test]
    fn a_stream_names_its_tenant_and_priority() {
        let k = Keys::new("vs");
        for tenant in ["a", "team-b.prod", DEFAULT_TENANT] {
            for p in [Priority::High, Priority::Normal] {
                assert_eq!(k.parse_stream(&k.stream(tenant, p)), Some((tenant, p)));
            }
        }
        assert_eq!(k.parse_stream("{vs}:tasks:a:urgent"), None);
        assert_eq!(k.parse_stream("{other}:tasks:a:high"), None);
        assert_eq!(k.parse_stream("{vs}:verdict:a:high"), None);
    }
}
