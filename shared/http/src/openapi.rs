//! The OpenAPI 3.1 document of every API (`GET /openapi.json`): the
//! Tracking, Profile, admin, Definitions, Destinations and privacy APIs.
//! Request bodies that are Rust types take their schema from the type
//! (`schemars`); the rest are written here, next to the list of routes,
//! and a test checks that every route the routers serve is documented.
//! The test command runs `schemathesis` against a running server with it.

use axum::routing::get;
use axum::{Json, Router};
use kindred_domain::settings::IdentitySettings;
use serde_json::{json, Map, Value};

/// `GET /openapi.json`.
pub fn router() -> Router {
    Router::new().route("/openapi.json", get(|| async { Json(document()) }))
}

/// Who may call an operation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    None,
    WriteKey,
    Access,
    Admin,
}

impl Auth {
    fn security(self) -> Value {
        match self {
            Self::None => json!([]),
            Self::WriteKey => json!([{"writeKey": []}]),
            Self::Access => json!([{"accessToken": []}]),
            Self::Admin => json!([{"adminToken": []}]),
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::None => "public",
            Self::WriteKey => "tracking",
            Self::Access => "profile",
            Self::Admin => "admin",
        }
    }

    /// The failures every operation of this kind can answer.
    fn errors(self) -> &'static [u16] {
        match self {
            Self::None => &[],
            Self::WriteKey => &[400, 401, 403, 413, 429, 503],
            Self::Access => &[400, 401, 404, 429, 501, 503],
            Self::Admin => &[400, 401, 404, 501, 503],
        }
    }
}

/// One operation.
struct Op {
    method: &'static str,
    path: String,
    id: String,
    summary: &'static str,
    auth: Auth,
    params: Vec<Value>,
    query: Vec<Value>,
    body: Option<Value>,
    ok: Vec<(u16, Value)>,
    /// Failures beyond the kind's usual ones.
    more_errors: &'static [u16],
    deprecated: bool,
}

impl Op {
    fn new(
        method: &'static str,
        path: impl Into<String>,
        id: impl Into<String>,
        summary: &'static str,
        auth: Auth,
    ) -> Self {
        Self {
            method,
            path: path.into(),
            id: id.into(),
            summary,
            auth,
            params: Vec::new(),
            query: Vec::new(),
            body: None,
            ok: Vec::new(),
            more_errors: &[],
            deprecated: false,
        }
    }

    fn path_params(mut self, names: &[&str]) -> Self {
        for n in names {
            self.params
                .push(json!({"$ref": format!("#/components/parameters/{n}")}));
        }
        self
    }

    fn query(mut self, name: &str, schema: Value, description: &str) -> Self {
        self.query.push(json!({
            "name": name, "in": "query", "required": false,
            "schema": schema, "description": description,
        }));
        self
    }

    fn body(mut self, schema: Value) -> Self {
        self.body = Some(schema);
        self
    }

    fn ok(mut self, status: u16, schema: Value) -> Self {
        self.ok.push((status, schema));
        self
    }

    fn errors(mut self, more: &'static [u16]) -> Self {
        self.more_errors = more;
        self
    }

    fn deprecated(mut self) -> Self {
        self.deprecated = true;
        self
    }

    fn to_json(&self) -> Value {
        let mut responses = Map::new();
        for (status, schema) in &self.ok {
            let r = if *status == 204 {
                json!({"description": "done (no body)"})
            } else {
                json!({"description": if *status < 300 { "success" } else { "a worker is down (the body says which)" },
                       "content": {"application/json": {"schema": schema}}})
            };
            responses.insert(status.to_string(), r);
        }
        let mut errors: Vec<u16> = self
            .auth
            .errors()
            .iter()
            .chain(self.more_errors)
            .copied()
            .collect();
        errors.sort_unstable();
        errors.dedup();
        for status in errors {
            responses.insert(
                status.to_string(),
                json!({"$ref": format!("#/components/responses/E{status}")}),
            );
        }
        let mut parameters = self.params.clone();
        parameters.extend(self.query.iter().cloned());
        let mut op = json!({
            "operationId": self.id,
            "summary": self.summary,
            "tags": [self.auth.tag()],
            "security": self.auth.security(),
            "responses": responses,
        });
        if !parameters.is_empty() {
            op["parameters"] = Value::Array(parameters);
        }
        if let Some(body) = &self.body {
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": body}}});
        }
        if self.deprecated {
            op["deprecated"] = json!(true);
        }
        op
    }
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn list_of(item: Value) -> Value {
    json!({"type": "object", "required": ["data"], "properties": {"data": {"type": "array", "items": item}}})
}

fn int(min: i64, max: i64) -> Value {
    json!({"type": "integer", "minimum": min, "maximum": max})
}

fn string() -> Value {
    json!({"type": "string"})
}

/// Every operation, in the order of the routers.
fn operations() -> Vec<Op> {
    use Auth::*;
    let mut ops = vec![
        Op::new("get", "/", "service", "What this server is", None)
            .ok(200, json!({"type": "object"})),
        Op::new(
            "get",
            "/healthz",
            "health",
            "Whether every worker runs, and each stage's lag",
            None,
        )
        .ok(200, r("Health"))
        .ok(503, r("Health")),
        Op::new("get", "/openapi.json", "openapi", "This document", None)
            .ok(200, json!({"type": "object"})),
        // Tracking API.
        Op::new(
            "post",
            "/v1/batch",
            "batch",
            "Send a batch of events (Segment's /v1/batch)",
            WriteKey,
        )
        .body(r("Batch"))
        .ok(200, r("Accepted")),
        Op::new(
            "post",
            "/v1/import",
            "import",
            "Send a batch of events (Segment's /v1/import)",
            WriteKey,
        )
        .body(r("Batch"))
        .ok(200, r("Accepted")),
        Op::new(
            "post",
            "/v1/b",
            "browser_batch",
            "A batch from analytics.js (the write key may be in the body)",
            WriteKey,
        )
        .body(r("Batch"))
        .ok(200, r("Accepted")),
        Op::new(
            "post",
            "/v1/m",
            "browser_metrics",
            "analytics.js's own client metrics (kept nowhere)",
            None,
        )
        .ok(204, Value::Null),
        Op::new(
            "post",
            "/v1/{call}",
            "call",
            "Send one event: identify, track, page, screen, group or alias (or i, t, p, s, g, a)",
            WriteKey,
        )
        .path_params(&["call"])
        .body(r("Event"))
        .ok(200, r("Accepted"))
        .errors(&[404]),
        Op::new(
            "get",
            "/v1/projects/{write_key}/settings",
            "browser_settings",
            "The settings analytics.js loads for a write key",
            None,
        )
        .path_params(&["write_key"])
        .ok(200, json!({"type": "object", "required": ["integrations"]}))
        .errors(&[403, 404, 429]),
    ];
    // Profile API, on both prefixes.
    for (prefix, deprecated) in [("/v1/spaces", false), ("/v1/namespaces", true)] {
        let resources: [(&str, &str, Value); 6] = [
            (
                "traits",
                "A profile's traits and computed values",
                r("Traits"),
            ),
            ("external_ids", "A profile's identifiers", r("ExternalIds")),
            ("events", "A profile's events", r("Events")),
            ("metadata", "A profile's metadata", r("Metadata")),
            ("links", "A profile's account links", r("Links")),
            (
                "merges",
                "A profile's merge history (users only)",
                r("Merges"),
            ),
        ];
        for (resource, summary, schema) in resources {
            let path = format!(
                "{prefix}/{{space_id}}/collections/{{collection}}/profiles/{{lookup}}/{resource}"
            );
            let id = format!(
                "{}profile_{resource}",
                if deprecated { "namespaces_" } else { "" }
            );
            let mut op = Op::new("get", path, id, summary, Access)
                .path_params(&["space_id", "collection", "lookup"])
                .ok(200, schema);
            op = match resource {
                "traits" => op
                    .query("include", string(), "trait keys, comma-separated")
                    .query(
                        "class",
                        json!({"type": "string", "enum": ["audience", "computed_trait"]}),
                        "only computed values of this class",
                    )
                    .query("limit", int(1, 200), "page size (default 10)")
                    .query("next", string(), "the cursor of the previous page")
                    .query(
                        "verbose",
                        json!({"type": "boolean"}),
                        "each trait as {value, source_id, updated_at}",
                    ),
                "external_ids" => op
                    .query("include", string(), "identifier types, comma-separated")
                    .query("limit", int(1, 100), "page size (default 10)")
                    .query("next", string(), "the cursor of the previous page")
                    .query("verbose", json!({"type": "boolean"}), "with added_at"),
                "events" => op
                    .query("start", string(), "ISO 8601 date or date-time")
                    .query("end", string(), "ISO 8601 date or date-time")
                    .query("include", string(), "event names, comma-separated")
                    .query("exclude", string(), "event names, comma-separated")
                    .query("limit", int(1, 100), "page size (default 10)")
                    .query("next", string(), "the cursor of the previous page")
                    .query(
                        "sort",
                        json!({"type": "string", "enum": ["asc", "desc"]}),
                        "order by time (default desc)",
                    ),
                "metadata" => op.query(
                    "verbose",
                    json!({"type": "boolean"}),
                    "accepted for compatibility",
                ),
                _ => op
                    .query("limit", int(1, 100), "page size (default 10)")
                    .query("next", string(), "the cursor of the previous page"),
            };
            if deprecated {
                op = op.deprecated();
            }
            ops.push(op);
        }
    }
    ops.extend([
        Op::new("get", "/v1/spaces/{space_id}/collections/users/profiles/{lookup}/violations", "profile_violations", "The identifiers merge protection refused on a profile", Access)
            .path_params(&["space_id", "lookup"])
            .query("since", string(), "RFC 3339 time")
            .query("next", string(), "the cursor of the previous page")
            .query("limit", int(1, 100), "page size (default 20)")
            .ok(200, r("Violations")),
        // Admin API.
        Op::new("get", "/v1/spaces/{space_id}/identity_settings", "get_identity_settings", "The space's identity settings", Admin)
            .path_params(&["space_id"])
            .ok(200, r("IdentitySettings")),
        Op::new("put", "/v1/spaces/{space_id}/identity_settings", "put_identity_settings", "Replace the identity settings", Admin)
            .path_params(&["space_id"])
            .body(r("IdentitySettings"))
            .ok(200, r("IdentitySettings")),
        Op::new("get", "/v1/spaces/{space_id}/tokens", "list_tokens", "The space's tokens (never their secrets)", Admin)
            .path_params(&["space_id"])
            .ok(200, list_of(r("Token"))),
        Op::new("post", "/v1/spaces/{space_id}/tokens", "create_token", "Mint a write key, access token or admin token", Admin)
            .path_params(&["space_id"])
            .body(json!({"type": "object", "additionalProperties": false, "required": ["kind"], "properties": {
                "kind": {"type": "string", "enum": ["write_key", "access_token", "admin_token"]},
                "label": {"type": ["string", "null"]}}}))
            .ok(201, r("Token")),
        Op::new("delete", "/v1/spaces/{space_id}/tokens/{token_id}", "revoke_token", "Revoke a token", Admin)
            .path_params(&["space_id", "token_id"])
            .ok(204, Value::Null)
            .errors(&[409]),
        // Definitions API.
    ]);
    for (collection, class) in [
        ("computed_traits", "computed_trait"),
        ("audiences", "audience"),
    ] {
        ops.extend([
            Op::new(
                "get",
                format!("/v1/spaces/{{space_id}}/{collection}"),
                format!("list_{collection}"),
                "The definitions",
                Admin,
            )
            .path_params(&["space_id"])
            .ok(200, list_of(r("Definition"))),
            Op::new(
                "get",
                format!("/v1/spaces/{{space_id}}/{collection}/{{key}}"),
                format!("get_{class}"),
                "One definition",
                Admin,
            )
            .path_params(&["space_id", "key"])
            .ok(200, r("Definition")),
            Op::new(
                "put",
                format!("/v1/spaces/{{space_id}}/{collection}/{{key}}"),
                format!("put_{class}"),
                "Create or replace a definition (backfills from stored history)",
                Admin,
            )
            .path_params(&["space_id", "key"])
            .body(r("DefinitionBody"))
            .ok(200, r("Definition"))
            .ok(201, r("Definition"))
            .errors(&[409]),
            Op::new(
                "delete",
                format!("/v1/spaces/{{space_id}}/{collection}/{{key}}"),
                format!("delete_{class}"),
                "Delete a definition",
                Admin,
            )
            .path_params(&["space_id", "key"])
            .ok(204, Value::Null)
            .errors(&[409]),
            Op::new(
                "post",
                format!("/v1/spaces/{{space_id}}/{collection}/{{key}}/backfill"),
                format!("backfill_{class}"),
                "Build a definition again from every profile's history",
                Admin,
            )
            .path_params(&["space_id", "key"])
            .ok(202, r("Definition")),
            Op::new(
                "get",
                format!("/v1/spaces/{{space_id}}/{collection}/{{key}}/members"),
                format!("members_{class}"),
                "The profiles it holds for (an audience's members, a computed trait's profiles with a value), by profile id",
                Admin,
            )
            .path_params(&["space_id", "key"])
            .query("after", string(), "the previous page's `cursor.next`")
            .query("limit", int(1, 1000), "page size (default 100)")
            .ok(200, r("Members")),
        ]);
    }
    ops.extend([
        Op::new("get", "/v1/spaces/{space_id}/changes", "changes", "Changes of computed values, oldest first", Admin)
            .path_params(&["space_id"])
            .query("since", json!({"type": "integer", "minimum": 0}), "the position of a previous page's cursor")
            .query("limit", int(1, 1000), "page size (default 100)")
            .ok(200, r("Changes")),
        Op::new("post", "/v1/spaces/{space_id}/lookback/run", "run_lookback", "Run the lookback expiry now (or as of a time)", Admin)
            .path_params(&["space_id"])
            .body(json!({"type": "object", "properties": {"as_of": {"type": ["string", "null"], "format": "date-time"}}}))
            .ok(200, json!({"type": "object", "required": ["as_of", "profiles_enqueued"]})),
        // Destinations API.
        Op::new("get", "/v1/spaces/{space_id}/destinations", "list_destinations", "The destinations", Admin)
            .path_params(&["space_id"])
            .ok(200, list_of(r("Destination"))),
        Op::new("get", "/v1/spaces/{space_id}/destinations/{destination_id}", "get_destination", "One destination", Admin)
            .path_params(&["space_id", "destination_id"])
            .ok(200, r("Destination")),
        Op::new("put", "/v1/spaces/{space_id}/destinations/{destination_id}", "put_destination", "Create or replace a destination", Admin)
            .path_params(&["space_id", "destination_id"])
            .body(r("DestinationBody"))
            .ok(200, r("Destination"))
            .ok(201, r("Destination")),
        Op::new("delete", "/v1/spaces/{space_id}/destinations/{destination_id}", "delete_destination", "Delete a destination", Admin)
            .path_params(&["space_id", "destination_id"])
            .ok(204, Value::Null),
        Op::new("get", "/v1/spaces/{space_id}/destinations/{destination_id}/status", "destination_status", "Delivered, pending, retrying and dead calls, and the last error", Admin)
            .path_params(&["space_id", "destination_id"])
            .ok(200, r("DestinationStatus")),
        Op::new("get", "/v1/spaces/{space_id}/destinations/{destination_id}/dead_letters", "dead_letters", "Calls given up on", Admin)
            .path_params(&["space_id", "destination_id"])
            .query("limit", int(1, 1000), "page size (default 100)")
            .ok(200, list_of(json!({"type": "object", "required": ["seq", "profile_id", "attempts", "error", "call"]}))),
        Op::new("post", "/v1/spaces/{space_id}/destinations/{destination_id}/replay", "replay", "Queue every dead letter again", Admin)
            .path_params(&["space_id", "destination_id"])
            .ok(202, json!({"type": "object", "required": ["replayed"], "properties": {"replayed": {"type": "integer", "minimum": 0}}})),
        // Privacy.
        Op::new("get", "/v1/spaces/{space_id}/regulations", "list_regulations", "Regulations, newest first", Admin)
            .path_params(&["space_id"])
            .query("limit", int(1, 100), "page size")
            .query("next", string(), "the cursor of the previous page")
            .ok(200, json!({"type": "object", "required": ["data", "cursor"], "properties": {"data": {"type": "array", "items": r("Regulation")}}})),
        Op::new("post", "/v1/spaces/{space_id}/regulations", "create_regulation", "Delete and/or suppress people, or lift a suppression", Admin)
            .path_params(&["space_id"])
            .body(json!({"type": "object", "additionalProperties": false, "required": ["regulation_type", "subject_type", "subject_ids"], "properties": {
                "regulation_type": {"type": "string", "enum": ["SUPPRESS_WITH_DELETE", "DELETE_INTERNAL", "SUPPRESS_ONLY", "UNSUPPRESS"]},
                "subject_type": {"type": "string", "minLength": 1, "maxLength": 64},
                "subject_ids": {"type": "array", "minItems": 1, "maxItems": 5000, "items": {"type": "string", "minLength": 1, "maxLength": 1024}}}}))
            .ok(201, r("Regulation")),
        Op::new("get", "/v1/spaces/{space_id}/regulations/{regulation_id}", "get_regulation", "One regulation, with its subjects", Admin)
            .path_params(&["space_id", "regulation_id"])
            .ok(200, r("Regulation")),
        Op::new("post", "/v1/spaces/{space_id}/collections/users/profiles/{lookup}/external_ids/delete", "remove_identifiers", "Take identifiers off a profile", Admin)
            .path_params(&["space_id", "lookup"])
            .body(json!({"type": "object", "required": ["external_ids"], "properties": {"external_ids": {"type": "array", "minItems": 1, "maxItems": 100,
                "items": {"type": "object", "required": ["type", "id"], "properties": {"type": {"type": "string", "minLength": 1}, "id": {"type": "string", "minLength": 1}}}}}}))
            .ok(200, json!({"type": "object", "required": ["removed"], "properties": {"removed": {"type": "array", "items": r("IdentifierRef")}}})),
        Op::new("post", "/v1/spaces/{space_id}/collections/users/profiles/{lookup}/merges/{child}/split", "split", "Undo a merge: the child is itself again", Admin)
            .path_params(&["space_id", "lookup", "child"])
            .ok(200, json!({"type": "object", "required": ["parent", "child", "moved_external_ids"], "properties": {
                "parent": string(), "child": string(), "moved_external_ids": {"type": "array", "items": r("IdentifierRef")}}})),
        Op::new("get", "/v1/spaces/{space_id}/violations", "space_violations", "Every identifier merge protection refused in the space", Admin)
            .path_params(&["space_id"])
            .query("since", string(), "RFC 3339 time")
            .query("next", string(), "the cursor of the previous page")
            .query("limit", int(1, 100), "page size (default 20)")
            .ok(200, r("Violations")),
    ]);
    ops
}

fn parameters() -> Value {
    let path = |name: &str, description: &str, schema: Value, example: &str| json!({"name": name, "in": "path", "required": true, "description": description, "schema": schema, "example": example});
    json!({
        "space_id": path("space_id", "the space", string(), "default"),
        "collection": path("collection", "users or accounts", json!({"type": "string", "enum": ["users", "accounts"]}), "users"),
        "lookup": path("lookup", "an identifier as type:value (email case-insensitive), or profile_id:prf_…; group_id:… for accounts", json!({"type": "string", "pattern": "^[^:]+:.+$"}), "user_id:u1"),
        "call": path("call", "the call", json!({"type": "string", "enum": ["identify", "track", "page", "screen", "group", "alias", "i", "t", "p", "s", "g", "a"]}), "track"),
        "write_key": path("write_key", "a write key", string(), "wk_example"),
        "token_id": path("token_id", "a token's id", string(), "tok_example"),
        "key": path("key", "the definition's key", json!({"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,100}$"}), "buyers"),
        "destination_id": path("destination_id", "the destination's id", json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}), "crm"),
        "regulation_id": path("regulation_id", "a regulation's id", string(), "reg_example"),
        "child": path("child", "the profile merged in", string(), "prf_example"),
    })
}

fn error_responses() -> Value {
    let mut out = Map::new();
    for (status, description) in [
        (400, "the request is invalid (the message names the field)"),
        (401, "no valid credentials for this space"),
        (
            403,
            "the origin is not allowed, or the operation is refused",
        ),
        (404, "not found"),
        (409, "conflicts with the current state"),
        (413, "the body is too large"),
        (429, "over the space's rate; see Retry-After"),
        (501, "not available in this deployment"),
        (
            503,
            "storage is briefly unavailable; retry after Retry-After",
        ),
    ] {
        out.insert(
            format!("E{status}"),
            json!({"description": description, "content": {"application/json": {"schema": r("Error")}}}),
        );
    }
    Value::Object(out)
}

fn schemas() -> Value {
    let ts = json!({"type": "string", "description": "ISO 8601 UTC time"});
    let cursor = json!({"type": "object", "required": ["has_more", "next"], "properties": {
        "url": string(), "has_more": {"type": "boolean"}, "next": string(), "limit": {"type": "integer"}}});
    let mut out = json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": string(), "message": string()}}}},
        "Health": {"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "down": {"type": "array", "items": {"type": "object", "required": ["worker", "reason"]}}}},
        "Event": {"type": "object", "description": "A Segment-spec call (https://segment.com/docs/connections/spec/): type, userId and/or anonymousId, event, properties, traits, context, timestamp, messageId, ..."},
        "Batch": {"type": "object", "required": ["batch"], "properties": {
            "batch": {"type": "array", "items": r("Event")},
            "context": {"type": "object"}, "integrations": {"type": "object"},
            "writeKey": {"type": "string", "description": "analytics.js's /v1/b only"}}},
        "Accepted": {"type": "object", "required": ["success"], "properties": {
            "success": {"const": true},
            "accepted": {"type": "integer", "minimum": 0},
            "rejected": {"type": "array", "items": {"type": "object", "required": ["index", "code", "message"]}}}},
        "Traits": {"type": "object", "required": ["traits", "cursor"], "properties": {"traits": {"type": "object"}, "cursor": cursor}},
        "ExternalId": {"type": "object", "required": ["id", "type", "source_id", "collection", "created_at", "encoding"], "properties": {
            "id": string(), "type": string(), "source_id": string(), "collection": string(),
            "created_at": ts, "encoding": string(), "first_message_id": string(), "added_at": ts}},
        "ExternalIds": {"type": "object", "required": ["data", "cursor"], "properties": {"data": {"type": "array", "items": r("ExternalId")}, "cursor": cursor}},
        "Events": {"type": "object", "required": ["data", "cursor"], "properties": {"data": {"type": "array", "items": {
            "type": "object", "required": ["type", "message_id", "timestamp", "external_ids"]}}, "cursor": cursor}},
        "Metadata": {"type": "object", "required": ["metadata"], "properties": {"metadata": {"type": "object", "required": ["created_at", "updated_at"]}}},
        "Links": {"type": "object", "required": ["data", "cursor"], "properties": {"data": {"type": "array", "items": {"type": "object", "required": ["to_collection", "external_ids"]}}, "cursor": cursor}},
        "Merges": {"type": "object", "required": ["profile_id", "data", "cursor"], "properties": {"profile_id": string(), "data": {"type": "array", "items": {
            "type": "object", "required": ["parent_id", "child_id", "message_id", "merged_at"]}}, "cursor": cursor}},
        "Violations": {"type": "object", "required": ["data", "cursor"], "properties": {"data": {"type": "array", "items": {
            "type": "object", "required": ["message_id", "identifier_type", "identifier_hash", "rule", "at"]}}}},
        "Token": {"type": "object", "required": ["id", "prefix", "kind", "created_at"], "properties": {
            "id": string(), "prefix": string(), "kind": {"type": "string", "enum": ["write_key", "access_token", "admin_token"]},
            "label": {"type": ["string", "null"]}, "created_at": ts, "revoked_at": {"type": ["string", "null"]},
            "token": {"type": "string", "description": "the secret: only in the answer that created it"}}},
        "DefinitionBody": {"type": "object", "description": "A computed trait or audience definition (README: Computed traits and audiences)"},
        "Definition": {"type": "object", "required": ["id", "key", "class", "version", "definition", "status"], "properties": {
            "id": string(), "key": string(), "class": {"type": "string", "enum": ["audience", "computed_trait"]},
            "version": {"type": "integer"}, "definition": {"type": "object"},
            "status": {"type": "string", "enum": ["backfilling", "ready", "failed"]},
            "size": {"type": ["integer", "null"], "minimum": 0, "description": "profiles it holds for (reads only; null: account-level)"}}},
        "Members": {"type": "object", "required": ["data", "cursor"], "properties": {"data": {"type": "array", "items": {
            "type": "object", "required": ["profile_id", "value", "updated_at"]}},
            "cursor": {"type": "object", "required": ["next"], "properties": {"next": {"type": ["string", "null"]}}}}},
        "Changes": {"type": "object", "required": ["data", "cursor"], "properties": {"data": {"type": "array", "items": {
            "type": "object", "required": ["seq", "key", "class", "new", "at"]}}}},
        "DestinationBody": {"type": "object", "required": ["kind"], "properties": {
            "kind": {"type": "string", "enum": ["webhook", "segment"]}, "name": string(),
            "url": {"type": "string", "format": "uri"}, "host": {"type": "string", "format": "uri"},
            "secret": string(), "write_key": string()}},
        "Destination": {"type": "object", "required": ["id", "version", "initial_sync"], "properties": {
            "id": string(), "version": {"type": "integer"}, "initial_sync": {"type": "string", "enum": ["pending", "done"]}}},
        "DestinationStatus": {"type": "object", "required": ["delivered", "pending", "retrying", "dead"], "properties": {
            "delivered": {"type": "integer"}, "pending": {"type": "integer"}, "retrying": {"type": "integer"}, "dead": {"type": "integer"}}},
        "Regulation": {"type": "object", "required": ["id", "regulation_type", "subject_type", "status"], "properties": {
            "id": string(), "regulation_type": string(), "subject_type": string(), "status": string()}},
        "IdentifierRef": {"type": "object", "required": ["type", "id"], "properties": {"type": string(), "id": string()}},
    });
    // The Rust types that are request bodies: their schemas come from
    // the types themselves.
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let mut generator = generator;
    let settings = generator.subschema_for::<IdentitySettings>();
    let defs = generator.take_definitions(true);
    let map = out.as_object_mut().expect("an object");
    for (name, schema) in defs {
        map.insert(name, schema);
    }
    if !map.contains_key("IdentitySettings") {
        map.insert("IdentitySettings".into(), settings.to_value());
    }
    out
}

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in operations() {
        let entry = paths.entry(op.path.clone()).or_insert_with(|| json!({}));
        entry[op.method] = op.to_json();
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Kindred",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "An open-source customer profile engine: Segment's Tracking API in, one profile per person, Segment's Profile API out, with computed traits, audiences and destinations.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "public", "description": "No credentials"},
            {"name": "tracking", "description": "The Tracking API: the write key as the HTTP Basic user name"},
            {"name": "profile", "description": "The Profile API: an access token as the HTTP Basic user name"},
            {"name": "admin", "description": "Admin, Definitions, Destinations and privacy: the admin token as the HTTP Basic user name"},
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "writeKey": {"type": "http", "scheme": "basic", "description": "the write key as user name, empty password"},
                "accessToken": {"type": "http", "scheme": "basic", "description": "an access token as user name, empty password"},
                "adminToken": {"type": "http", "scheme": "basic", "description": "an admin token as user name, empty password"},
            },
            "parameters": parameters(),
            "responses": error_responses(),
            "schemas": schemas(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route templates the routers serve, read from their source.
    fn served_routes() -> Vec<String> {
        let sources = [
            include_str!("lib.rs"),
            include_str!("tracking.rs"),
            include_str!("profile/mod.rs"),
            include_str!("admin.rs"),
            include_str!("compute.rs"),
            include_str!("destinations.rs"),
            include_str!("privacy.rs"),
            include_str!("openapi.rs"),
        ];
        let mut routes = Vec::new();
        for source in sources {
            let mut rest = source;
            while let Some(at) = rest.find(".route(") {
                rest = &rest[at + 7..];
                let Some(open) = rest.find('"') else { break };
                let tail = &rest[open + 1..];
                let close = tail.find('"').expect("a closed string");
                let route = tail[..close].replace("{{", "{").replace("}}", "}");
                if route.starts_with('/') {
                    routes.push(route);
                }
            }
        }
        routes
    }

    #[test]
    fn every_served_route_is_documented() {
        let doc = document();
        let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
        let documented = |route: &str| {
            // A route's parameters may be named differently, and
            // `{collection}`-style routes are documented per value.
            let shape = |p: &str| -> Vec<String> {
                p.split('/')
                    .map(|s| {
                        if s.starts_with('{') {
                            "*".to_string()
                        } else {
                            s.to_string()
                        }
                    })
                    .collect()
            };
            let want = shape(route);
            paths.iter().any(|p| {
                let have = shape(p);
                have.len() == want.len() && have.iter().zip(&want).all(|(h, w)| h == w || w == "*")
            })
        };
        let routes = served_routes();
        assert!(routes.len() > 25, "{routes:?}");
        for route in routes {
            assert!(
                documented(&route),
                "{route} is served but not in the OpenAPI document"
            );
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_with_resolvable_references() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let text = doc.to_string();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("\"$ref\":\"#/") {
            rest = &rest[at + 9..];
            let end = rest.find('"').unwrap();
            let pointer = &rest[..end];
            assert!(doc.pointer(pointer).is_some(), "unresolved {pointer}");
        }
        assert!(
            doc["components"]["schemas"]["IdentitySettings"]["properties"]["types"].is_object()
        );
    }
}
