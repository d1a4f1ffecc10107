//! Definitions on DynamoDB: the space's set (one partition, versioned),
//! writes checked with the others in one transaction, backfill progress.

use super::*;

impl DefinitionSet {
    pub fn ruleset(&self) -> Result<Ruleset> {
        Ok(Ruleset::new(self.parsed()?)?)
    }

    pub(super) fn parsed(&self) -> Result<Vec<Definition>> {
        self.records
            .iter()
            .map(|r| Ok(Definition::parse(r.class, &r.key, r.version, &r.body)?))
            .collect()
    }

    pub fn backfilling(&self) -> Vec<(String, u64)> {
        self.records
            .iter()
            .filter(|r| matches!(r.status, DefinitionStatus::Backfilling { .. }))
            .map(|r| (r.key.clone(), r.version))
            .collect()
    }
}

pub(super) fn record_of(item: &Item) -> Result<DefinitionRecord> {
    let class = get_s(item, "class")?;
    Ok(DefinitionRecord {
        key: get_s(item, SK)?
            .strip_prefix("KEY#")
            .unwrap_or_default()
            .to_string(),
        class: Class::parse(class)
            .ok_or_else(|| StoreError::Service(format!("unknown class {class}")))?,
        version: get_n(item, "version")? as u64,
        body: serde_json::from_str(get_s(item, "body")?)?,
        status: match get_s(item, "bf_status")? {
            "backfilling" => DefinitionStatus::Backfilling {
                done: get_n(item, "bf_done")?.max(0) as u64,
                total: get_n(item, "bf_total")?.max(0) as u64,
            },
            "failed" => DefinitionStatus::Failed(opt_s(item, "error").unwrap_or("").to_string()),
            _ => DefinitionStatus::Ready,
        },
        created_at: get_n(item, "created_at")?,
        updated_at: get_n(item, "updated_at")?,
    })
}

impl DynamoStore {
    /// The space's definitions and set version, read strongly consistent
    /// (one partition; the set item sorts first, so any definition read
    /// is at least as new as the set version read).
    pub(crate) async fn definition_set(&self, space_id: &str) -> Result<DefinitionSet> {
        let items = self
            .items_with_prefix(definitions_key(space_id), "", true)
            .await?;
        let mut set = DefinitionSet {
            version: 0,
            last_version: 0,
            records: Vec::new(),
        };
        for item in &items {
            if opt_s(item, SK) == Some(SET) {
                set.version = get_n(item, "version")?;
                set.last_version = get_n(item, "last_version")?;
            } else {
                set.records.push(record_of(item)?);
            }
        }
        Ok(set)
    }

    /// Creates, replaces (`body`), re-versions (`bump_only`) or deletes
    /// (`body: None`) a definition, as one transaction conditioned on the
    /// set version read; the whole set is validated first. Every
    /// definition still backfilling starts a new pass. Returns the record
    /// written (`None` after a delete), or `NotFound`.
    pub(crate) async fn write_definition(
        &self,
        space_id: &str,
        class: Class,
        key_name: &str,
        body: Option<&Value>,
        bump_only: bool,
    ) -> Result<(Option<DefinitionRecord>, i64)> {
        if self.get(space_key(space_id), false).await?.is_none() {
            return Err(StoreError::NotFound);
        }
        for attempt in 0..ATTEMPTS {
            jitter(attempt).await;
            let now = now_millis();
            let set = self.definition_set(space_id).await?;
            let existing = set.records.iter().find(|r| r.key == key_name);
            let pk = definitions_key(space_id);
            let mut items = Vec::new();
            let written = match body {
                Some(body) => {
                    if bump_only && existing.is_none_or(|e| e.class != class) {
                        return Err(StoreError::NotFound);
                    }
                    // Versions never repeat, even across delete and re-create.
                    let version = (set.last_version + 1).max(now);
                    let parsed = Definition::parse(class, key_name, version as u64, body)?;
                    check_put(existing.map(|e| e.class), parsed, set.parsed()?)?;
                    let record = DefinitionRecord {
                        key: key_name.to_string(),
                        class,
                        version: version as u64,
                        body: body.clone(),
                        status: DefinitionStatus::Backfilling { done: 0, total: 0 },
                        created_at: existing.map_or(now, |e| e.created_at),
                        updated_at: now,
                    };
                    let mut item = key(pk.clone(), &definition_sort_key(key_name));
                    item.insert("class".into(), s(class.as_str()));
                    item.insert("version".into(), n(version));
                    item.insert("body".into(), s(body.to_string()));
                    item.insert("bf_status".into(), s("backfilling"));
                    item.insert("bf_done".into(), n(0));
                    item.insert("bf_total".into(), n(0));
                    item.insert("bf_paged".into(), AttributeValue::Bool(false));
                    item.insert("bf_pass".into(), n(set.version + 1));
                    item.insert("created_at".into(), n(record.created_at));
                    item.insert("updated_at".into(), n(now));
                    let put = Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(item))
                        .build()
                        .map_err(service)?;
                    items.push(TransactWriteItem::builder().put(put).build());
                    Some(record)
                }
                None => {
                    match existing {
                        Some(e) if e.class == class => {}
                        _ => return Err(StoreError::NotFound),
                    }
                    check_delete(key_name, set.parsed()?)?;
                    let delete = Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(key(pk.clone(), &definition_sort_key(key_name))))
                        .build()
                        .map_err(service)?;
                    items.push(TransactWriteItem::builder().delete(delete).build());
                    None
                }
            };
            // The other backfilling definitions restart in the new pass.
            for (other, _) in set.backfilling() {
                if other == key_name {
                    continue;
                }
                let update = Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(key(pk.clone(), &definition_sort_key(&other))))
                    .update_expression(
                        "SET bf_done = :zero, bf_total = :zero, bf_paged = :no, bf_pass = :pass REMOVE bf_cursor",
                    )
                    .expression_attribute_values(":zero", n(0))
                    .expression_attribute_values(":no", AttributeValue::Bool(false))
                    .expression_attribute_values(":pass", n(set.version + 1))
                    .build()
                    .map_err(service)?;
                items.push(TransactWriteItem::builder().update(update).build());
            }
            let last_version = written
                .as_ref()
                .map_or(set.last_version, |r| r.version as i64);
            let update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(pk.clone(), SET)))
                .update_expression("SET version = :new, last_version = :last")
                .condition_expression("attribute_not_exists(pk) OR version = :read")
                .expression_attribute_values(":new", n(set.version + 1))
                .expression_attribute_values(":last", n(last_version))
                .expression_attribute_values(":read", n(set.version))
                .build()
                .map_err(service)?;
            items.push(TransactWriteItem::builder().update(update).build());
            let listed = Put::builder()
                .table_name(&self.table)
                .set_item(Some(key(DEFINITION_SPACES.to_string(), space_id)))
                .build()
                .map_err(service)?;
            items.push(TransactWriteItem::builder().put(listed).build());
            if items.len() > MAX_TRANSACTION_ITEMS {
                return Err(StoreError::Invalid(
                    "too many definitions backfilling at once; wait for some to finish".into(),
                ));
            }
            match self.transact(items).await {
                Ok(()) => return Ok((written, set.version + 1)),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Every space that has (or had) definitions.
    pub async fn definition_spaces(&self) -> Result<Vec<String>> {
        Ok(self
            .items_with_prefix(DEFINITION_SPACES.to_string(), "", false)
            .await?
            .iter()
            .filter_map(|i| opt_s(i, SK).map(str::to_string))
            .collect())
    }

    /// Counts one page of a backfill pass (`page`: the cursor it started
    /// at, the cursor after it, and whether it was the last), or one root
    /// recomputed (`page: None`); then finishes each definition whose
    /// roots are all done. A page is counted once even if its message is
    /// redelivered; counts of another pass or version are ignored.
    pub(crate) async fn backfill_progress(
        &self,
        space_id: &str,
        pass: i64,
        defs: &[(String, u64)],
        by: u64,
        page: Option<(&str, &str, bool)>,
    ) -> Result<()> {
        let now = now_millis();
        for (key_name, version) in defs {
            let pk = definitions_key(space_id);
            let sk = definition_sort_key(key_name);
            let guard = HashMap::from([
                (":v".to_string(), n(*version)),
                (":pass".to_string(), n(pass)),
                (":b".to_string(), s("backfilling")),
            ]);
            let mut condition = String::from("version = :v AND bf_pass = :pass AND bf_status = :b");
            let mut values = guard.clone();
            values.insert(":by".into(), n(by));
            let expression = match page {
                None => "ADD bf_done :by".to_string(),
                Some((from, to, last)) => {
                    condition.push_str(if from.is_empty() {
                        " AND attribute_not_exists(bf_cursor)"
                    } else {
                        " AND bf_cursor = :from"
                    });
                    if !from.is_empty() {
                        values.insert(":from".into(), s(from));
                    }
                    values.insert(":to".into(), s(to));
                    values.insert(":paged".into(), AttributeValue::Bool(last));
                    "ADD bf_total :by SET bf_cursor = :to, bf_paged = :paged".to_string()
                }
            };
            if !self
                .update_if(&pk, &sk, &expression, &condition, values)
                .await?
            {
                continue;
            }
            let mut values = guard;
            values.insert(":ready".into(), s("ready"));
            values.insert(":yes".into(), AttributeValue::Bool(true));
            values.insert(":now".into(), n(now));
            self.update_if(
                &pk,
                &sk,
                "SET bf_status = :ready, updated_at = :now",
                "version = :v AND bf_pass = :pass AND bf_status = :b AND bf_paged = :yes AND bf_done >= bf_total",
                values,
            )
            .await?;
        }
        Ok(())
    }
}
