//! The OpenAPI 3 document of the API, built from the same route table the router mounts
//! ([`super::v1::routes`]), so a route cannot exist without being described or be described
//! without existing.
//!
//! Owns only the description; it reads nothing but the route table.

use serde_json::{Map, Value, json};

use super::error::{FORBIDDEN_MESSAGE, UNAUTHORIZED_MESSAGE};
use super::v1::Route;

fn error_response(description: &str, code: &str, message: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"},
            "example": {"success": false, "error": {"code": code, "message": message}}
        }}
    })
}

fn operation(r: &Route) -> Value {
    let mut params: Vec<Value> = r
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    params.extend(r.params.iter().map(|(name, description)| {
        json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": "string"}})
    }));
    let mut ok_content =
        json!({"application/json": {"schema": {"$ref": "#/components/schemas/Success"}}});
    if r.csv {
        ok_content["text/csv"] = json!({"schema": {"type": "string"}});
    }
    let mut responses = Map::new();
    let status = if r.method == "POST" && r.path == "/v1/silences" {
        "201"
    } else {
        "200"
    };
    responses.insert(
        status.into(),
        json!({"description": "success", "content": ok_content}),
    );
    let mut op = json!({
        "summary": r.summary,
        "operationId": format!("{} {}", r.method, r.path),
        "parameters": params,
    });
    if let Some(scope) = r.scope {
        responses.insert(
            "401".into(),
            error_response(
                "missing, malformed, unknown, expired or revoked credentials",
                "unauthorized",
                UNAUTHORIZED_MESSAGE,
            ),
        );
        responses.insert("403".into(), error_response(&format!("another organization, an MCP outside the key's access, or a key without the scope {}", scope.as_str()), "forbidden", FORBIDDEN_MESSAGE));
        responses.insert("429".into(), json!({"description": "too many failed authentication attempts from this IP; see Retry-After", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
        responses.insert("400".into(), json!({"description": "a parameter is not valid", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
        op["security"] = json!([{"ApiKey": [scope.as_str()]}, {"AdminToken": []}]);
        op["x-required-scope"] = json!(scope.as_str());
    } else {
        op["security"] = json!([]);
    }
    if r.body {
        op["requestBody"] = json!({"required": false, "content": {"application/json": {"schema": {"type": "object"}}}});
    }
    op["responses"] = Value::Object(responses);
    op
}

/// The document, with every route of `routes`.
pub fn document(routes: &[Route]) -> Value {
    let mut paths = Map::new();
    for r in routes {
        let item = paths
            .entry(r.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        item[r.method.to_ascii_lowercase()] = operation(r);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "keywatch",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Usage, limits, alerts and key hygiene of PlexMCP API keys. Authenticate with `Authorization: ApiKey pmcp_...` (a key with the scope reports:read or alerts:write, limited to its organization and MCPs) or `Authorization: Bearer <admin token>`."
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "Authorization", "description": "`ApiKey pmcp_...`, exactly: scheme, one space, the key"},
                "AdminToken": {"type": "http", "scheme": "bearer"}
            },
            "schemas": {
                "Success": {"type": "object", "required": ["success", "data"], "properties": {
                    "success": {"type": "boolean", "enum": [true]},
                    "data": {},
                    "next_cursor": {"type": "string", "nullable": true, "description": "lists only: pass as cursor for the next page; null on the last"}
                }},
                "Error": {"type": "object", "required": ["success", "error"], "properties": {
                    "success": {"type": "boolean", "enum": [false]},
                    "error": {"type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string"}, "message": {"type": "string"}
                    }}
                }}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described_once() {
        let routes = super::super::v1::routes();
        let doc = document(&routes);
        let described: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| item.as_object().unwrap().len())
            .sum();
        assert_eq!(described, routes.len());
        for r in &routes {
            let op = &doc["paths"][r.path][r.method.to_ascii_lowercase()];
            assert_eq!(op["summary"], r.summary, "{} {}", r.method, r.path);
            let path_params = op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["in"] == "path")
                .count();
            assert_eq!(path_params, r.path.matches('{').count());
        }
    }
}
