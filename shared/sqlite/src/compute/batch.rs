//! One compute transaction's profiles: loaded once, brought up to date
//! in the fold order of `kindred_store::compute`, evaluated and written.

use super::*;

impl Loaded {
    /// A profile's row as read (or none yet), decoded.
    pub(super) fn decode(row: Option<StateRow>, now: Millis, ruleset: &Ruleset) -> Result<Loaded> {
        let (state, stored) = match &row {
            Some(r) => (decode_state(&r.state)?, serde_json::from_str(&r.computed)?),
            None => (ProfileState::default(), ComputedValues::new()),
        };
        Ok(Loaded {
            stale: ruleset.has_stale(&state),
            state,
            stored,
            now,
            dirty: false,
            traits: None,
            row,
            settled: false,
        })
    }
}

impl Batch<'_> {
    /// Reads the states of these roots (those not loaded yet) and decodes
    /// them in parallel, ahead of [`Batch::touch`].
    pub(super) fn preload(&mut self, roots: Vec<Root>) -> Result<()> {
        let mut roots = roots.into_iter();
        let mut decoded = Vec::with_capacity(roots.len());
        let tx = self.tx;
        let profiles = &self.profiles;
        // Rows are read on this thread while others decode those read.
        pipeline(
            self.threads,
            || {
                for (ruleset, space_id, root, now) in roots.by_ref() {
                    let key = (space_id, root);
                    if !profiles.contains_key(&key) {
                        let row = read_state(tx, &key.0, &key.1)?;
                        return Ok(Some((key, row, now, ruleset)));
                    }
                }
                Ok(None)
            },
            |(key, row, now, ruleset)| {
                Ok::<_, StoreError>((key, Loaded::decode(row, now, &ruleset)?))
            },
            |d| {
                decoded.push(d?);
                Ok::<_, StoreError>(())
            },
        )?;
        for (key, loaded) in decoded {
            self.profiles.entry(key).or_insert(loaded);
        }
        Ok(())
    }

    /// Loads (once per batch) the root's state, folding in the states of
    /// profiles merged into it since, and rebuilds from history the
    /// definitions it has no current state for, from the events before
    /// `history_before` (those already folded into some state).
    pub(super) fn touch(
        &mut self,
        ruleset: &Ruleset,
        space_id: &str,
        root: &str,
        history_before: i64,
        now: Millis,
        traits: Option<String>,
    ) -> Result<&mut Loaded> {
        let tx = self.tx;
        let loaded = match self
            .profiles
            .entry((space_id.to_string(), root.to_string()))
        {
            btree_map::Entry::Occupied(e) => e.into_mut(),
            btree_map::Entry::Vacant(e) => {
                let row = read_state(tx, space_id, root)?;
                e.insert(Loaded::decode(row, now, ruleset)?)
            }
        };
        loaded.now = loaded.now.max(now);
        if traits.is_some() {
            loaded.traits = traits;
        }
        if loaded.settled {
            return Ok(loaded);
        }
        // States of profiles merged into this one (each event is in exactly
        // one state, so merging them is exact).
        // (Plain indexed lookups, one per tree member: the planner cannot
        // turn them into a scan.)
        let tree = crate::profiles::tree(tx, space_id, root)?;
        for child in &tree[1..] {
            let Some(row) = read_state(tx, space_id, child)? else {
                continue;
            };
            absorb(
                ruleset,
                (&mut loaded.state, &mut loaded.stored),
                (
                    decode_state(&row.state)?,
                    serde_json::from_str(&row.computed)?,
                ),
            );
            tx.prepare_cached(
                "DELETE FROM compute_states WHERE space_id = ?1 AND profile_id = ?2",
            )?
            .execute(params![space_id, child])?;
            loaded.dirty = true;
            // (Merging drops definitions either side had no current state for.)
            loaded.stale = true;
        }
        if !loaded.stale {
            loaded.settled = true;
            return Ok(loaded);
        }
        if !ruleset.stale(&loaded.state).is_empty() {
            let mut history: Vec<String> = Vec::new();
            let mut stmt = self.tx.prepare_cached(
                "SELECT body FROM events INDEXED BY events_by_profile
                 WHERE space_id = ?1 AND profile_id = ?2 AND seq < ?3",
            )?;
            for member in tree.iter().map(String::as_str) {
                let rows = stmt.query_map(params![space_id, member, history_before], |r| {
                    r.get::<_, crate::body::StoredBody>(0)
                })?;
                for body in rows {
                    history.push(body?.0);
                }
            }
            self.stats.rebuilt += rebuild_stale(ruleset, &mut loaded.state, &history)? as u64;
            loaded.dirty = true;
        }
        loaded.settled = true;
        Ok(loaded)
    }

    /// Evaluates and writes every dirty profile; appends the changes.
    /// Profiles are evaluated and encoded on other threads while this one
    /// reads traits and writes the profiles evaluated before.
    pub(super) fn flush(&mut self, rulesets: &HashMap<String, (i64, Arc<Ruleset>)>) -> Result<()> {
        let mut profiles = std::mem::take(&mut self.profiles).into_iter();
        let tx = self.tx;
        let stats = &mut self.stats;
        pipeline(
            self.threads,
            || {
                for ((space_id, root), mut p) in profiles.by_ref() {
                    if !p.dirty {
                        continue;
                    }
                    let Some((_, ruleset)) = rulesets.get(&space_id) else {
                        continue;
                    };
                    // (The custom traits are parsed off this thread.)
                    let traits: Option<String> = if !ruleset.reads_custom_traits() {
                        None
                    } else if let Some(t) = p.traits.take() {
                        Some(t)
                    } else {
                        tx.prepare_cached(
                            "SELECT traits FROM profiles WHERE space_id = ?1 AND profile_id = ?2",
                        )?
                        .query_row(params![space_id, root], |r| r.get::<_, String>(0))
                        .optional()?
                    };
                    return Ok(Some((space_id, root, p, traits, Arc::clone(ruleset))));
                }
                Ok(None)
            },
            |(space_id, root, mut p, traits, ruleset)| {
                let traits: Traits = match traits {
                    Some(t) => serde_json::from_str(&t)?,
                    None => Traits::new(),
                };
                let Recomputed {
                    values,
                    changes,
                    due,
                } = recompute(&ruleset, &mut p.state, p.stored, &traits, p.now);
                let size = p.row.as_ref().map_or(0, |r| r.state.len());
                let state = encode_state(&p.state, size + 64)?;
                let computed = serde_json::to_string(&values)?;
                // Nothing to write when the state, the values and the next
                // change are what is stored (a recompute that time did not
                // move); there are no changes then either.
                let unchanged = p
                    .row
                    .as_ref()
                    .is_some_and(|r| r.due == due && r.state == state && r.computed == computed);
                Ok::<_, StoreError>(Flushed {
                    space_id,
                    root,
                    write: (!unchanged).then_some((state, computed)),
                    due,
                    changes,
                    now: p.now,
                })
            },
            |f| {
                let Flushed {
                    space_id,
                    root,
                    write,
                    due,
                    changes,
                    now,
                } = f?;
                stats.recomputed += 1;
                let Some((state, computed)) = write else {
                    return Ok(());
                };
                stats.written += 1;
                tx.prepare_cached(
                    "INSERT INTO compute_states (space_id, profile_id, state, computed, due)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (space_id, profile_id) DO UPDATE SET state = excluded.state,
                       computed = excluded.computed, due = excluded.due",
                )?
                .execute(params![space_id, root, state, computed, due])?;
                let mut insert = tx.prepare_cached(
                    "INSERT INTO changes (space_id, profile_id, key, class, old, new, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for c in &changes {
                    insert.execute(params![
                        space_id,
                        root,
                        c.key,
                        c.class.as_str(),
                        c.old.as_ref().map(Value::to_string),
                        c.new.to_string(),
                        now
                    ])?;
                }
                stats.changes += changes.len() as u64;
                Ok::<_, StoreError>(())
            },
        )
    }
}
