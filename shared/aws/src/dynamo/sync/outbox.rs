//! Each destination's outbox on DynamoDB: the queued calls, their
//! attempts, dead letters and replays.

use super::*;

#[async_trait]
impl Outbox for DynamoStore {
    async fn enqueue(
        &self,
        space_id: &str,
        destination_id: &str,
        calls: Vec<(String, Value)>,
    ) -> Result<()> {
        if calls.is_empty() {
            return Ok(());
        }
        // Each chunk is one transaction with the counter's move, so calls
        // become visible in the order of their numbers.
        for chunk in calls.chunks(MAX_TRANSACT - 1) {
            let mut attempt = 0u32;
            loop {
                let item = self
                    .destination_item(space_id, destination_id)
                    .await?
                    .ok_or(StoreError::NotFound)?;
                let read = opt_n(&item, "next_seq").unwrap_or(0);
                let mut actions = vec![TransactWriteItem::builder()
                    .update(
                        aws_sdk_dynamodb::types::Update::builder()
                            .table_name(&self.table)
                            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
                            .update_expression("SET next_seq = :new")
                            .condition_expression("next_seq = :read")
                            .expression_attribute_values(":new", n(read + chunk.len() as i64))
                            .expression_attribute_values(":read", n(read))
                            .build()
                            .map_err(service)?,
                    )
                    .build()];
                for (i, (profile_id, call)) in chunk.iter().enumerate() {
                    let mut item = key(
                        out_key(space_id, destination_id),
                        &seq_sort(read + 1 + i as i64),
                    );
                    item.insert("profile_id".into(), s(profile_id));
                    item.insert("call".into(), s(call.to_string()));
                    item.insert("attempts".into(), n(0));
                    actions.push(
                        TransactWriteItem::builder()
                            .put(
                                Put::builder()
                                    .table_name(&self.table)
                                    .set_item(Some(item))
                                    .build()
                                    .map_err(service)?,
                            )
                            .build(),
                    );
                }
                match self.transact(actions).await {
                    Ok(()) => break,
                    // Another writer moved the counter first: read again.
                    Err(StoreError::Conflict) if attempt < PUT_ATTEMPTS => {
                        attempt += 1;
                        crate::dynamo::backoff(attempt, 6).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn next_calls(
        &self,
        space_id: &str,
        destination_id: &str,
        limit: usize,
    ) -> Result<Vec<PendingCall>> {
        self.partition(out_key(space_id, destination_id), Some(limit))
            .await?
            .iter()
            .map(|item| {
                Ok(PendingCall {
                    seq: get_s(item, SK)?
                        .parse()
                        .map_err(|_| StoreError::Undecodable("a queued call's key".into()))?,
                    call: get_s(item, "call")?.to_string(),
                    attempts: opt_n(item, "attempts").unwrap_or(0) as u32,
                })
            })
            .collect()
    }

    async fn record(
        &self,
        space_id: &str,
        destination_id: &str,
        seqs: &[i64],
        attempt: Attempt,
    ) -> Result<()> {
        let queue = out_key(space_id, destination_id);
        let dest = key(space_key(space_id), &dest_sort(destination_id));
        let stats = match &attempt {
            Attempt::Delivered { at } => {
                let deletes = seqs
                    .iter()
                    .map(|seq| {
                        Ok(WriteRequest::builder()
                            .delete_request(
                                DeleteRequest::builder()
                                    .set_key(Some(key(queue.clone(), &seq_sort(*seq))))
                                    .build()
                                    .map_err(service)?,
                            )
                            .build())
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.batch_write(deletes).await?;
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(dest))
                    .update_expression("ADD delivered :n SET last_success_at = :at")
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_values(":n", n(seqs.len()))
                    .expression_attribute_values(":at", n(at))
            }
            Attempt::Failed { error, dead } => {
                let text = match error.status {
                    Some(code) => format!("{code}: {}", error.message),
                    None => error.message.clone(),
                };
                if *dead {
                    let mut actions = Vec::new();
                    let keys: Vec<Item> = seqs
                        .iter()
                        .map(|q| key(queue.clone(), &seq_sort(*q)))
                        .collect();
                    for item in self.batch_get(keys, true).await? {
                        let sk = get_s(&item, SK)?.to_string();
                        let mut letter = item.clone();
                        letter.insert(PK.into(), s(dead_key(space_id, destination_id)));
                        letter.insert(
                            "attempts".into(),
                            n(opt_n(&item, "attempts").unwrap_or(0) + 1),
                        );
                        letter.insert("error".into(), s(&text));
                        actions.extend(self.moved(letter, key(queue.clone(), &sk))?);
                    }
                    self.transact_chunks(actions).await?;
                } else {
                    for seq in seqs {
                        let request = self
                            .client
                            .update_item()
                            .table_name(&self.table)
                            .set_key(Some(key(queue.clone(), &seq_sort(*seq))))
                            .update_expression("ADD attempts :one SET #e = :e")
                            .condition_expression("attribute_exists(pk)")
                            .expression_attribute_names("#e", "error")
                            .expression_attribute_values(":one", n(1))
                            .expression_attribute_values(":e", s(&text));
                        // Gone already (delivered by a run before): nothing to count.
                        self.conditional_update(request).await?;
                    }
                }
                let mut update = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(dest))
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_values(":at", n(error.at))
                    .expression_attribute_values(":m", s(&error.message));
                update = match error.status {
                    Some(code) => update
                        .update_expression(
                            "SET last_error_at = :at, last_error_message = :m, last_error_status = :st",
                        )
                        .expression_attribute_values(":st", n(code)),
                    None => update.update_expression(
                        "SET last_error_at = :at, last_error_message = :m REMOVE last_error_status",
                    ),
                };
                update
            }
        };
        // The destination was deleted meanwhile: nothing to count.
        self.conditional_update(stats).await?;
        Ok(())
    }
}
