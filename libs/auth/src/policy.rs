//! The access policy of every RPC, read from the contract's own declarations.
//!
//! Each convoy RPC carries `option (convoy.v1.access) = {...}` in its `.proto`; this table
//! is built from the embedded descriptor set, with each `team_fields` path resolved to field
//! numbers, so the layer finds the teams a request names without decoding it into its type.
//! A method without a policy is refused by the layer, and a test fails on it.
//!
//! prost drops extensions when it decodes `prost_types` descriptors, so the few descriptor
//! fields needed here are declared again below, with the extension as a plain field.

use std::collections::HashMap;
use std::sync::OnceLock;

use convoy_proto::v1::{AccessPolicy, AccessRole, TeamScope};
use prost::Message;

use crate::claims::Caller;

/// The policy of one method, ready for the layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodPolicy {
    /// The method's path (`/convoy.v1.CacheService/Get`), for refusals.
    pub path: String,
    /// The least role needed.
    pub role: AccessRole,
    /// Where the teams it touches are named.
    pub scope: TeamScope,
    /// Field-number paths of the team-naming fields, with their dotted names.
    pub team_fields: Vec<TeamField>,
    /// Whether the client streams requests (each message is checked).
    pub client_streaming: bool,
}

impl MethodPolicy {
    /// Whether the method is fleet-scoped (`TEAM_SCOPE_FLEET`, or no scope, which counts as
    /// fleet): it is about no one team, so team lists cannot bound it.
    pub fn is_fleet_scoped(&self) -> bool {
        matches!(self.scope, TeamScope::Fleet | TeamScope::Unspecified)
    }

    /// Ok if `caller` may call this method as far as the fleet-wide grant goes: a
    /// fleet-scoped method needs it ([`Caller::holds_fleet_grant`]), whatever teams the
    /// token names (`"*"` included), so an admin of some teams administers only those.
    /// Otherwise, the refusal's message.
    pub fn require_fleet_grant(&self, caller: &Caller) -> Result<(), String> {
        if !self.is_fleet_scoped() || caller.holds_fleet_grant(self.role) {
            return Ok(());
        }
        Err(format!(
            "{} is fleet-wide: it needs a token with the fleet-wide grant (\"fleet\": true); \
             a token naming teams, even \"*\", reaches only their data",
            self.path
        ))
    }
}

/// One team-naming field of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeamField {
    /// The dotted path as declared (`filter.parent`), for error details.
    pub name: String,
    /// Its field numbers from the request message down.
    pub numbers: Vec<u32>,
}

/// Why the contract's policies do not make a table (a build problem, caught by tests).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The descriptor set does not decode.
    #[error("the descriptor set does not decode: {0}")]
    Decode(String),
    /// A method declares no policy.
    #[error("{0} declares no (convoy.v1.access) option")]
    Missing(String),
    /// A policy names a field its request message does not have.
    #[error("{method}: team field {field:?} does not resolve: {why}")]
    BadField {
        /// The method.
        method: String,
        /// The declared path.
        field: String,
        /// What is wrong.
        why: String,
    },
    /// A team-scoped method names no team field, or a fleet one names some.
    #[error("{0}: team_fields must be set exactly when the scope names teams")]
    Scope(String),
}

#[derive(Clone, PartialEq, Message)]
struct FileSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<File>,
}

#[derive(Clone, PartialEq, Message)]
struct File {
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(message, repeated, tag = "4")]
    message_type: Vec<MessageType>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<Service>,
}

#[derive(Clone, PartialEq, Message)]
struct MessageType {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "2")]
    field: Vec<Field>,
    #[prost(message, repeated, tag = "3")]
    nested_type: Vec<MessageType>,
}

#[derive(Clone, PartialEq, Message)]
struct Field {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(int32, optional, tag = "3")]
    number: Option<i32>,
    #[prost(int32, optional, tag = "5")]
    r#type: Option<i32>,
    #[prost(string, optional, tag = "6")]
    type_name: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Service {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "2")]
    method: Vec<Method>,
}

#[derive(Clone, PartialEq, Message)]
struct Method {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    input_type: Option<String>,
    #[prost(message, optional, tag = "4")]
    options: Option<MethodOptions>,
    #[prost(bool, optional, tag = "5")]
    client_streaming: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct MethodOptions {
    #[prost(message, optional, tag = "51001")]
    access: Option<AccessPolicy>,
}

/// `FieldDescriptorProto.Type` values a team field may pass through or end at.
const TYPE_STRING: i32 = 9;
const TYPE_MESSAGE: i32 = 11;

/// Every message type of `set` by its fully qualified name (`.convoy.v1.Conversation`).
fn message_types(set: &FileSet) -> HashMap<String, &MessageType> {
    fn visit<'a>(prefix: &str, m: &'a MessageType, out: &mut HashMap<String, &'a MessageType>) {
        let name = format!("{prefix}.{}", m.name());
        for nested in &m.nested_type {
            visit(&name, nested, out);
        }
        out.insert(name, m);
    }
    let mut out = HashMap::new();
    for file in &set.file {
        let prefix = match file.package() {
            "" => String::new(),
            package => format!(".{package}"),
        };
        for m in &file.message_type {
            visit(&prefix, m, &mut out);
        }
    }
    out
}

fn resolve(
    types: &HashMap<String, &MessageType>,
    input: &str,
    path: &str,
) -> Result<Vec<u32>, String> {
    let mut message = *types.get(input).ok_or("the request type is unknown")?;
    let mut numbers = Vec::new();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let field = message
            .field
            .iter()
            .find(|f| f.name() == *part)
            .ok_or_else(|| format!("no field {part:?}"))?;
        numbers.push(u32::try_from(field.number()).map_err(|_| "negative field number")?);
        let last = i + 1 == parts.len();
        match (last, field.r#type()) {
            (true, TYPE_STRING) => {}
            (true, _) => return Err(format!("{part:?} is not a string")),
            (false, TYPE_MESSAGE) => {
                message = *types
                    .get(field.type_name())
                    .ok_or_else(|| format!("type of {part:?} unknown"))?;
            }
            (false, _) => return Err(format!("{part:?} is not a message")),
        }
    }
    Ok(numbers)
}

/// Builds the table from an encoded descriptor set (convoy's, or a test's).
pub fn build(descriptor_set: &[u8]) -> Result<HashMap<String, MethodPolicy>, PolicyError> {
    let set = FileSet::decode(descriptor_set).map_err(|e| PolicyError::Decode(e.to_string()))?;
    let types = message_types(&set);
    let mut table = HashMap::new();
    for file in &set.file {
        if !file.package().starts_with("convoy.") {
            continue;
        }
        for service in &file.service {
            for method in &service.method {
                let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                let access = method
                    .options
                    .as_ref()
                    .and_then(|o| o.access.clone())
                    .ok_or_else(|| PolicyError::Missing(path.clone()))?;
                let scope = access.scope();
                let names_teams = matches!(scope, TeamScope::Request | TeamScope::CacheKey);
                if names_teams == access.team_fields.is_empty() {
                    return Err(PolicyError::Scope(path));
                }
                let team_fields = access
                    .team_fields
                    .iter()
                    .map(|field| {
                        resolve(&types, method.input_type(), field)
                            .map(|numbers| TeamField {
                                name: field.clone(),
                                numbers,
                            })
                            .map_err(|why| PolicyError::BadField {
                                method: path.clone(),
                                field: field.clone(),
                                why,
                            })
                    })
                    .collect::<Result<_, _>>()?;
                table.insert(
                    path.clone(),
                    MethodPolicy {
                        path,
                        role: access.role(),
                        scope,
                        team_fields,
                        client_streaming: method.client_streaming(),
                    },
                );
            }
        }
    }
    Ok(table)
}

/// The table of convoy's own contract.
pub fn table() -> &'static HashMap<String, MethodPolicy> {
    static TABLE: OnceLock<HashMap<String, MethodPolicy>> = OnceLock::new();
    TABLE.get_or_init(|| {
        build(convoy_proto::FILE_DESCRIPTOR_SET)
            .expect("every convoy RPC declares a valid access policy (see policy tests)")
    })
}

/// The policy of the method at `path`, if it is a convoy method.
pub fn policy(path: &str) -> Option<&'static MethodPolicy> {
    table().get(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_convoy_rpc_declares_a_policy_whose_team_fields_resolve() {
        let table = build(convoy_proto::FILE_DESCRIPTOR_SET).expect("the contract's policies");
        // The same methods the retry layer knows (every RPC of the contract).
        let methods: Vec<_> = convoy_proto::methods::all_methods().collect();
        assert_eq!(table.len(), methods.len());
        for method in methods {
            let policy = &table[method];
            assert_ne!(policy.role, AccessRole::Unspecified, "{method}");
            assert_ne!(policy.scope, TeamScope::Unspecified, "{method}");
        }
    }

    #[test]
    fn nested_and_repeated_team_fields_resolve_to_numbers() {
        let update = policy("/convoy.v1.ConversationService/UpdateConversation").unwrap();
        assert_eq!(update.role, AccessRole::Writer);
        assert_eq!(update.team_fields[0].numbers, vec![1, 1]);
        let batch = policy("/convoy.v1.ConversationService/BatchGetConversations").unwrap();
        assert_eq!(
            batch
                .team_fields
                .iter()
                .map(|f| f.numbers.clone())
                .collect::<Vec<_>>(),
            vec![vec![1], vec![2]]
        );
        let ingest = policy("/convoy.v1.IngestService/IngestEvents").unwrap();
        assert!(ingest.client_streaming);
        assert_eq!(ingest.team_fields[1].numbers, vec![2, 1]);
        let flush = policy("/convoy.v1.CacheService/Flush").unwrap();
        assert_eq!(
            (flush.role, flush.scope),
            (AccessRole::Admin, TeamScope::Fleet)
        );
    }

    #[test]
    fn every_fleet_scoped_rpc_needs_the_grant_and_no_team_scoped_one_does() {
        use crate::claims::{AUDIENCE, Claims, Role};
        let caller = |role, fleet| Caller {
            actor: std::sync::Arc::new(Claims {
                sub: "t".into(),
                teams: vec!["*".into()],
                role,
                exp: 0,
                iat: 0,
                aud: AUDIENCE.into(),
                fleet,
            }),
            subject: None,
        };
        let mut fleet_scoped = Vec::new();
        for (path, policy) in table() {
            let admin = caller(Role::Admin, false);
            assert_eq!(
                policy.require_fleet_grant(&admin).is_err(),
                policy.is_fleet_scoped(),
                "{path}"
            );
            assert!(
                policy
                    .require_fleet_grant(&caller(Role::Admin, true))
                    .is_ok()
            );
            if policy.is_fleet_scoped() {
                fleet_scoped.push(path.rsplit('/').next().unwrap());
            }
        }
        fleet_scoped.sort_unstable();
        assert_eq!(
            fleet_scoped,
            [
                "AddShard",
                "CancelOperation",
                "Flush",
                "GetFleetOverview",
                "GetOperation",
                "GetShardMap",
                "ListOperations",
                "ListShards",
                "MoveSlots",
                "Stats",
                "WatchShardMap",
            ]
        );
    }

    /// A hand-made descriptor set: one service, one method, with or without a policy.
    fn descriptor(access: Option<AccessPolicy>) -> Vec<u8> {
        FileSet {
            file: vec![File {
                package: Some("convoy.test".into()),
                message_type: vec![MessageType {
                    name: Some("Req".into()),
                    field: vec![Field {
                        name: Some("parent".into()),
                        number: Some(1),
                        r#type: Some(TYPE_STRING),
                        type_name: None,
                    }],
                    nested_type: vec![],
                }],
                service: vec![Service {
                    name: Some("Svc".into()),
                    method: vec![Method {
                        name: Some("Do".into()),
                        input_type: Some(".convoy.test.Req".into()),
                        options: Some(MethodOptions { access }),
                        client_streaming: None,
                    }],
                }],
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn a_method_without_a_policy_or_with_a_bad_field_fails_the_table() {
        assert_eq!(
            build(&descriptor(None)),
            Err(PolicyError::Missing("/convoy.test.Svc/Do".into()))
        );
        let bad = AccessPolicy {
            role: AccessRole::Reader.into(),
            scope: TeamScope::Request.into(),
            team_fields: vec!["parent.name".into()],
        };
        assert!(matches!(
            build(&descriptor(Some(bad))),
            Err(PolicyError::BadField { .. })
        ));
        let unscoped = AccessPolicy {
            role: AccessRole::Reader.into(),
            scope: TeamScope::Request.into(),
            team_fields: vec![],
        };
        assert!(matches!(
            build(&descriptor(Some(unscoped))),
            Err(PolicyError::Scope(_))
        ));
        let good = AccessPolicy {
            role: AccessRole::Reader.into(),
            scope: TeamScope::Request.into(),
            team_fields: vec!["parent".into()],
        };
        assert_eq!(build(&descriptor(Some(good))).unwrap().len(), 1);
    }
}
