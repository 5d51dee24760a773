use virus_scanner_protocol::task::Priority;

/// Redis key names. All carry the hash tag `{prefix}` so that they live in one cluster slot.
#[derive(Debug, Clone)]
pub struct Keys {
    tag: String,
    pub high: String,
    pub normal: String,
    pub db_version: String,
    /// Never written: producers park a `BLPOP` on it to notice a lost connection at once.
    pub canary: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let tag = format!("{{{prefix}}}");
        Keys {
            high: format!("{tag}:tasks:high"),
            normal: format!("{tag}:tasks:normal"),
            db_version: format!("{tag}:db-version"),
            canary: format!("{tag}:connection-canary"),
            tag,
        }
    }

    pub fn stream(&self, priority: Priority) -> &str {
        match priority {
            Priority::High => &self.high,
            Priority::Normal => &self.normal,
        }
    }

    pub fn verdict(&self, task_id: &str) -> String {
        format!("{}:verdict:{task_id}", self.tag)
    }

    pub fn cache(&self, db_version: &str, sha256: &[u8]) -> String {
        format!("{}:cache:{db_version}:{}", self.tag, hex::encode(sha256))
    }

    /// The hash that holds the chunks of a body sent through Redis. Derived from the task,
    /// never named by it: a task cannot make a consumer read or delete another key. The
    /// tenant (checked by `validate_tenant_key`) comes first, so that a per-tenant ACL can
    /// grant `{prefix}:body:<tenant>:*` alone.
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
            k.high.clone(),
            k.normal.clone(),
            k.db_version.clone(),
            k.canary.clone(),
            k.verdict("t1"),
            k.cache("27000", &[0xab; 32]),
            k.body("tenant-a", "t1"),
        ] {
            assert!(key.starts_with("{vs}:"), "{key}");
        }
        assert_eq!(k.cache("1", &[0xab, 0x01]), "{vs}:cache:1:ab01");
        assert_eq!(k.body("tenant-a", "t1"), "{vs}:body:tenant-a:t1");
    }
}
