//! Wire compatibility of `raftmq_proto::rocketmq::v2` with the RocketMQ 5 gRPC
//! protocol of apache/rocketmq-apis 68c2cc9, which the official SDKs speak.
//!
//! The tables below were extracted from the upstream `definition.proto` and
//! `service.proto` at 68c2cc9 (not from our files). The tests compare them with
//! the descriptor set protoc produced from OUR `.proto` files at build time
//! (`FILE_DESCRIPTOR_SET`), so a renamed, renumbered or retyped field, a changed
//! oneof, enum value or RPC fails here. No network or upstream checkout needed.
//!
//! `upstream_full_diff` (ignored) additionally compiles the upstream files from a
//! local mirror, when there is one, and compares whole descriptors.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use raftmq_proto::rocketmq::v2 as pb;

const PACKAGE: &str = "apache.rocketmq.v2";
const DEFINITION: &str = "apache/rocketmq/v2/definition.proto";
const SERVICE: &str = "apache/rocketmq/v2/service.proto";

/// (message, field, number, type). The type is rendered as `[repeated |optional |oneof <name> ]<type>`
/// with message/enum types relative to the package, or `map<K, V>`.
const FIELDS: &[(&str, &str, i32, &str)] = &[
    ("FilterExpression", "type", 1, "FilterType"),
    ("FilterExpression", "expression", 2, "string"),
    ("RetryPolicy", "max_attempts", 1, "int32"),
    (
        "RetryPolicy",
        "exponential_backoff",
        2,
        "oneof strategy ExponentialBackoff",
    ),
    (
        "RetryPolicy",
        "customized_backoff",
        3,
        "oneof strategy CustomizedBackoff",
    ),
    ("ExponentialBackoff", "initial", 1, "google.protobuf.Duration"),
    ("ExponentialBackoff", "max", 2, "google.protobuf.Duration"),
    ("ExponentialBackoff", "multiplier", 3, "float"),
    ("CustomizedBackoff", "next", 1, "repeated google.protobuf.Duration"),
    ("Resource", "resource_namespace", 1, "string"),
    ("Resource", "name", 2, "string"),
    ("SubscriptionEntry", "topic", 1, "Resource"),
    ("SubscriptionEntry", "expression", 2, "FilterExpression"),
    ("Address", "host", 1, "string"),
    ("Address", "port", 2, "int32"),
    ("Endpoints", "scheme", 1, "AddressScheme"),
    ("Endpoints", "addresses", 2, "repeated Address"),
    ("Broker", "name", 1, "string"),
    ("Broker", "id", 2, "int32"),
    ("Broker", "endpoints", 3, "Endpoints"),
    ("MessageQueue", "topic", 1, "Resource"),
    ("MessageQueue", "id", 2, "int32"),
    ("MessageQueue", "permission", 3, "Permission"),
    ("MessageQueue", "broker", 4, "Broker"),
    ("MessageQueue", "accept_message_types", 5, "repeated MessageType"),
    ("Digest", "type", 1, "DigestType"),
    ("Digest", "checksum", 2, "string"),
    ("SystemProperties", "tag", 1, "optional string"),
    ("SystemProperties", "keys", 2, "repeated string"),
    ("SystemProperties", "message_id", 3, "string"),
    ("SystemProperties", "body_digest", 4, "Digest"),
    ("SystemProperties", "body_encoding", 5, "Encoding"),
    ("SystemProperties", "message_type", 6, "MessageType"),
    ("SystemProperties", "born_timestamp", 7, "google.protobuf.Timestamp"),
    ("SystemProperties", "born_host", 8, "string"),
    (
        "SystemProperties",
        "store_timestamp",
        9,
        "optional google.protobuf.Timestamp",
    ),
    ("SystemProperties", "store_host", 10, "string"),
    (
        "SystemProperties",
        "delivery_timestamp",
        11,
        "optional google.protobuf.Timestamp",
    ),
    ("SystemProperties", "receipt_handle", 12, "optional string"),
    ("SystemProperties", "queue_id", 13, "int32"),
    ("SystemProperties", "queue_offset", 14, "optional int64"),
    (
        "SystemProperties",
        "invisible_duration",
        15,
        "optional google.protobuf.Duration",
    ),
    ("SystemProperties", "delivery_attempt", 16, "optional int32"),
    ("SystemProperties", "message_group", 17, "optional string"),
    ("SystemProperties", "trace_context", 18, "optional string"),
    (
        "SystemProperties",
        "orphaned_transaction_recovery_duration",
        19,
        "optional google.protobuf.Duration",
    ),
    ("SystemProperties", "dead_letter_queue", 20, "optional DeadLetterQueue"),
    ("SystemProperties", "lite_topic", 21, "optional string"),
    ("SystemProperties", "priority", 22, "optional int32"),
    ("DeadLetterQueue", "topic", 1, "string"),
    ("DeadLetterQueue", "message_id", 2, "string"),
    ("Message", "topic", 1, "Resource"),
    ("Message", "user_properties", 2, "map<string, string>"),
    ("Message", "system_properties", 3, "SystemProperties"),
    ("Message", "body", 4, "bytes"),
    ("Assignment", "message_queue", 1, "MessageQueue"),
    ("Status", "code", 1, "Code"),
    ("Status", "message", 2, "string"),
    ("UA", "language", 1, "Language"),
    ("UA", "version", 2, "string"),
    ("UA", "platform", 3, "string"),
    ("UA", "hostname", 4, "string"),
    ("Settings", "client_type", 1, "optional ClientType"),
    ("Settings", "access_point", 2, "optional Endpoints"),
    ("Settings", "backoff_policy", 3, "optional RetryPolicy"),
    ("Settings", "request_timeout", 4, "optional google.protobuf.Duration"),
    ("Settings", "publishing", 5, "oneof pub_sub Publishing"),
    ("Settings", "subscription", 6, "oneof pub_sub Subscription"),
    ("Settings", "user_agent", 7, "UA"),
    ("Settings", "metric", 8, "Metric"),
    ("Publishing", "topics", 1, "repeated Resource"),
    ("Publishing", "max_body_size", 2, "int32"),
    ("Publishing", "validate_message_type", 3, "bool"),
    ("Subscription", "group", 1, "optional Resource"),
    ("Subscription", "subscriptions", 2, "repeated SubscriptionEntry"),
    ("Subscription", "fifo", 3, "optional bool"),
    ("Subscription", "receive_batch_size", 4, "optional int32"),
    (
        "Subscription",
        "long_polling_timeout",
        5,
        "optional google.protobuf.Duration",
    ),
    ("Subscription", "lite_subscription_quota", 6, "optional int32"),
    ("Subscription", "max_lite_topic_size", 7, "optional int32"),
    ("Metric", "on", 1, "bool"),
    ("Metric", "endpoints", 2, "optional Endpoints"),
    ("QueryRouteRequest", "topic", 1, "Resource"),
    ("QueryRouteRequest", "endpoints", 2, "Endpoints"),
    ("QueryRouteResponse", "status", 1, "Status"),
    ("QueryRouteResponse", "message_queues", 2, "repeated MessageQueue"),
    ("SendMessageRequest", "messages", 1, "repeated Message"),
    ("SendResultEntry", "status", 1, "Status"),
    ("SendResultEntry", "message_id", 2, "string"),
    ("SendResultEntry", "transaction_id", 3, "string"),
    ("SendResultEntry", "offset", 4, "int64"),
    ("SendResultEntry", "recall_handle", 5, "string"),
    ("SendMessageResponse", "status", 1, "Status"),
    ("SendMessageResponse", "entries", 2, "repeated SendResultEntry"),
    ("QueryAssignmentRequest", "topic", 1, "Resource"),
    ("QueryAssignmentRequest", "group", 2, "Resource"),
    ("QueryAssignmentRequest", "endpoints", 3, "Endpoints"),
    ("QueryAssignmentResponse", "status", 1, "Status"),
    ("QueryAssignmentResponse", "assignments", 2, "repeated Assignment"),
    ("ReceiveMessageRequest", "group", 1, "Resource"),
    ("ReceiveMessageRequest", "message_queue", 2, "MessageQueue"),
    ("ReceiveMessageRequest", "filter_expression", 3, "FilterExpression"),
    ("ReceiveMessageRequest", "batch_size", 4, "int32"),
    (
        "ReceiveMessageRequest",
        "invisible_duration",
        5,
        "optional google.protobuf.Duration",
    ),
    ("ReceiveMessageRequest", "auto_renew", 6, "bool"),
    (
        "ReceiveMessageRequest",
        "long_polling_timeout",
        7,
        "optional google.protobuf.Duration",
    ),
    ("ReceiveMessageRequest", "attempt_id", 8, "optional string"),
    ("ReceiveMessageResponse", "status", 1, "oneof content Status"),
    ("ReceiveMessageResponse", "message", 2, "oneof content Message"),
    (
        "ReceiveMessageResponse",
        "delivery_timestamp",
        3,
        "oneof content google.protobuf.Timestamp",
    ),
    ("AckMessageEntry", "message_id", 1, "string"),
    ("AckMessageEntry", "receipt_handle", 2, "string"),
    ("AckMessageEntry", "lite_topic", 3, "optional string"),
    ("AckMessageRequest", "group", 1, "Resource"),
    ("AckMessageRequest", "topic", 2, "Resource"),
    ("AckMessageRequest", "entries", 3, "repeated AckMessageEntry"),
    ("AckMessageResultEntry", "message_id", 1, "string"),
    ("AckMessageResultEntry", "receipt_handle", 2, "string"),
    ("AckMessageResultEntry", "status", 3, "Status"),
    ("AckMessageResponse", "status", 1, "Status"),
    ("AckMessageResponse", "entries", 2, "repeated AckMessageResultEntry"),
    ("ForwardMessageToDeadLetterQueueRequest", "group", 1, "Resource"),
    ("ForwardMessageToDeadLetterQueueRequest", "topic", 2, "Resource"),
    ("ForwardMessageToDeadLetterQueueRequest", "receipt_handle", 3, "string"),
    ("ForwardMessageToDeadLetterQueueRequest", "message_id", 4, "string"),
    ("ForwardMessageToDeadLetterQueueRequest", "delivery_attempt", 5, "int32"),
    (
        "ForwardMessageToDeadLetterQueueRequest",
        "max_delivery_attempts",
        6,
        "int32",
    ),
    (
        "ForwardMessageToDeadLetterQueueRequest",
        "lite_topic",
        7,
        "optional string",
    ),
    ("ForwardMessageToDeadLetterQueueResponse", "status", 1, "Status"),
    ("HeartbeatRequest", "group", 1, "optional Resource"),
    ("HeartbeatRequest", "client_type", 2, "ClientType"),
    ("HeartbeatResponse", "status", 1, "Status"),
    ("EndTransactionRequest", "topic", 1, "Resource"),
    ("EndTransactionRequest", "message_id", 2, "string"),
    ("EndTransactionRequest", "transaction_id", 3, "string"),
    ("EndTransactionRequest", "resolution", 4, "TransactionResolution"),
    ("EndTransactionRequest", "source", 5, "TransactionSource"),
    ("EndTransactionRequest", "trace_context", 6, "string"),
    ("EndTransactionResponse", "status", 1, "Status"),
    ("RecoverOrphanedTransactionCommand", "message", 1, "Message"),
    ("RecoverOrphanedTransactionCommand", "transaction_id", 2, "string"),
    ("TelemetryCommand", "status", 1, "optional Status"),
    ("TelemetryCommand", "settings", 2, "oneof command Settings"),
    (
        "TelemetryCommand",
        "thread_stack_trace",
        3,
        "oneof command ThreadStackTrace",
    ),
    (
        "TelemetryCommand",
        "verify_message_result",
        4,
        "oneof command VerifyMessageResult",
    ),
    (
        "TelemetryCommand",
        "recover_orphaned_transaction_command",
        5,
        "oneof command RecoverOrphanedTransactionCommand",
    ),
    (
        "TelemetryCommand",
        "print_thread_stack_trace_command",
        6,
        "oneof command PrintThreadStackTraceCommand",
    ),
    (
        "TelemetryCommand",
        "verify_message_command",
        7,
        "oneof command VerifyMessageCommand",
    ),
    (
        "TelemetryCommand",
        "reconnect_endpoints_command",
        8,
        "oneof command ReconnectEndpointsCommand",
    ),
    (
        "TelemetryCommand",
        "notify_unsubscribe_lite_command",
        9,
        "oneof command NotifyUnsubscribeLiteCommand",
    ),
    ("NotifyClientTerminationRequest", "group", 1, "optional Resource"),
    ("NotifyClientTerminationResponse", "status", 1, "Status"),
    ("ChangeInvisibleDurationRequest", "group", 1, "Resource"),
    ("ChangeInvisibleDurationRequest", "topic", 2, "Resource"),
    ("ChangeInvisibleDurationRequest", "receipt_handle", 3, "string"),
    (
        "ChangeInvisibleDurationRequest",
        "invisible_duration",
        4,
        "google.protobuf.Duration",
    ),
    ("ChangeInvisibleDurationRequest", "message_id", 5, "string"),
    ("ChangeInvisibleDurationRequest", "lite_topic", 6, "optional string"),
    ("ChangeInvisibleDurationRequest", "suspend", 7, "optional bool"),
    ("ChangeInvisibleDurationResponse", "status", 1, "Status"),
    ("ChangeInvisibleDurationResponse", "receipt_handle", 2, "string"),
    ("RecallMessageRequest", "topic", 1, "Resource"),
    ("RecallMessageRequest", "recall_handle", 2, "string"),
    ("RecallMessageResponse", "status", 1, "Status"),
    ("RecallMessageResponse", "message_id", 2, "string"),
];

/// Every message of definition.proto and service.proto, in upstream order (map entries excluded).
const ALL_MESSAGES: &[&str] = &[
    "FilterExpression",
    "RetryPolicy",
    "ExponentialBackoff",
    "CustomizedBackoff",
    "Resource",
    "SubscriptionEntry",
    "Address",
    "Endpoints",
    "Broker",
    "MessageQueue",
    "Digest",
    "SystemProperties",
    "DeadLetterQueue",
    "Message",
    "Assignment",
    "Status",
    "UA",
    "Settings",
    "Publishing",
    "Subscription",
    "Metric",
    "OffsetOption",
    "QueryRouteRequest",
    "QueryRouteResponse",
    "SendMessageRequest",
    "SendResultEntry",
    "SendMessageResponse",
    "QueryAssignmentRequest",
    "QueryAssignmentResponse",
    "ReceiveMessageRequest",
    "ReceiveMessageResponse",
    "AckMessageEntry",
    "AckMessageRequest",
    "AckMessageResultEntry",
    "AckMessageResponse",
    "ForwardMessageToDeadLetterQueueRequest",
    "ForwardMessageToDeadLetterQueueResponse",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "EndTransactionRequest",
    "EndTransactionResponse",
    "PrintThreadStackTraceCommand",
    "ReconnectEndpointsCommand",
    "ThreadStackTrace",
    "VerifyMessageCommand",
    "VerifyMessageResult",
    "RecoverOrphanedTransactionCommand",
    "NotifyUnsubscribeLiteCommand",
    "TelemetryCommand",
    "NotifyClientTerminationRequest",
    "NotifyClientTerminationResponse",
    "ChangeInvisibleDurationRequest",
    "ChangeInvisibleDurationResponse",
    "PullMessageRequest",
    "PullMessageResponse",
    "UpdateOffsetRequest",
    "UpdateOffsetResponse",
    "GetOffsetRequest",
    "GetOffsetResponse",
    "QueryOffsetRequest",
    "QueryOffsetResponse",
    "RecallMessageRequest",
    "RecallMessageResponse",
    "SyncLiteSubscriptionRequest",
    "SyncLiteSubscriptionResponse",
];

/// (enum, value, number) for every enum of both files, in upstream order.
const ENUM_VALUES: &[(&str, &str, i32)] = &[
    ("OffsetOption.Policy", "LAST", 0),
    ("OffsetOption.Policy", "MIN", 1),
    ("OffsetOption.Policy", "MAX", 2),
    ("TransactionResolution", "TRANSACTION_RESOLUTION_UNSPECIFIED", 0),
    ("TransactionResolution", "COMMIT", 1),
    ("TransactionResolution", "ROLLBACK", 2),
    ("TransactionSource", "SOURCE_UNSPECIFIED", 0),
    ("TransactionSource", "SOURCE_CLIENT", 1),
    ("TransactionSource", "SOURCE_SERVER_CHECK", 2),
    ("Permission", "PERMISSION_UNSPECIFIED", 0),
    ("Permission", "NONE", 1),
    ("Permission", "READ", 2),
    ("Permission", "WRITE", 3),
    ("Permission", "READ_WRITE", 4),
    ("FilterType", "FILTER_TYPE_UNSPECIFIED", 0),
    ("FilterType", "TAG", 1),
    ("FilterType", "SQL", 2),
    ("AddressScheme", "ADDRESS_SCHEME_UNSPECIFIED", 0),
    ("AddressScheme", "IPv4", 1),
    ("AddressScheme", "IPv6", 2),
    ("AddressScheme", "DOMAIN_NAME", 3),
    ("MessageType", "MESSAGE_TYPE_UNSPECIFIED", 0),
    ("MessageType", "NORMAL", 1),
    ("MessageType", "FIFO", 2),
    ("MessageType", "DELAY", 3),
    ("MessageType", "TRANSACTION", 4),
    ("MessageType", "LITE", 5),
    ("MessageType", "PRIORITY", 6),
    ("DigestType", "DIGEST_TYPE_UNSPECIFIED", 0),
    ("DigestType", "CRC32", 1),
    ("DigestType", "MD5", 2),
    ("DigestType", "SHA1", 3),
    ("ClientType", "CLIENT_TYPE_UNSPECIFIED", 0),
    ("ClientType", "PRODUCER", 1),
    ("ClientType", "PUSH_CONSUMER", 2),
    ("ClientType", "SIMPLE_CONSUMER", 3),
    ("ClientType", "PULL_CONSUMER", 4),
    ("ClientType", "LITE_PUSH_CONSUMER", 5),
    ("ClientType", "LITE_SIMPLE_CONSUMER", 6),
    ("Encoding", "ENCODING_UNSPECIFIED", 0),
    ("Encoding", "IDENTITY", 1),
    ("Encoding", "GZIP", 2),
    ("Code", "CODE_UNSPECIFIED", 0),
    ("Code", "OK", 20000),
    ("Code", "MULTIPLE_RESULTS", 30000),
    ("Code", "BAD_REQUEST", 40000),
    ("Code", "ILLEGAL_ACCESS_POINT", 40001),
    ("Code", "ILLEGAL_TOPIC", 40002),
    ("Code", "ILLEGAL_CONSUMER_GROUP", 40003),
    ("Code", "ILLEGAL_MESSAGE_TAG", 40004),
    ("Code", "ILLEGAL_MESSAGE_KEY", 40005),
    ("Code", "ILLEGAL_MESSAGE_GROUP", 40006),
    ("Code", "ILLEGAL_MESSAGE_PROPERTY_KEY", 40007),
    ("Code", "INVALID_TRANSACTION_ID", 40008),
    ("Code", "ILLEGAL_MESSAGE_ID", 40009),
    ("Code", "ILLEGAL_FILTER_EXPRESSION", 40010),
    ("Code", "ILLEGAL_INVISIBLE_TIME", 40011),
    ("Code", "ILLEGAL_DELIVERY_TIME", 40012),
    ("Code", "INVALID_RECEIPT_HANDLE", 40013),
    ("Code", "MESSAGE_PROPERTY_CONFLICT_WITH_TYPE", 40014),
    ("Code", "UNRECOGNIZED_CLIENT_TYPE", 40015),
    ("Code", "MESSAGE_CORRUPTED", 40016),
    ("Code", "CLIENT_ID_REQUIRED", 40017),
    ("Code", "ILLEGAL_POLLING_TIME", 40018),
    ("Code", "ILLEGAL_OFFSET", 40019),
    ("Code", "ILLEGAL_LITE_TOPIC", 40020),
    ("Code", "UNAUTHORIZED", 40100),
    ("Code", "PAYMENT_REQUIRED", 40200),
    ("Code", "FORBIDDEN", 40300),
    ("Code", "NOT_FOUND", 40400),
    ("Code", "MESSAGE_NOT_FOUND", 40401),
    ("Code", "TOPIC_NOT_FOUND", 40402),
    ("Code", "CONSUMER_GROUP_NOT_FOUND", 40403),
    ("Code", "OFFSET_NOT_FOUND", 40404),
    ("Code", "REQUEST_TIMEOUT", 40800),
    ("Code", "PAYLOAD_TOO_LARGE", 41300),
    ("Code", "MESSAGE_BODY_TOO_LARGE", 41301),
    ("Code", "MESSAGE_BODY_EMPTY", 41302),
    ("Code", "PRECONDITION_FAILED", 42800),
    ("Code", "TOO_MANY_REQUESTS", 42900),
    ("Code", "LITE_TOPIC_QUOTA_EXCEEDED", 42901),
    ("Code", "LITE_SUBSCRIPTION_QUOTA_EXCEEDED", 42902),
    ("Code", "REQUEST_HEADER_FIELDS_TOO_LARGE", 43100),
    ("Code", "MESSAGE_PROPERTIES_TOO_LARGE", 43101),
    ("Code", "INTERNAL_ERROR", 50000),
    ("Code", "INTERNAL_SERVER_ERROR", 50001),
    ("Code", "HA_NOT_AVAILABLE", 50002),
    ("Code", "NOT_IMPLEMENTED", 50100),
    ("Code", "PROXY_TIMEOUT", 50400),
    ("Code", "MASTER_PERSISTENCE_TIMEOUT", 50401),
    ("Code", "SLAVE_PERSISTENCE_TIMEOUT", 50402),
    ("Code", "UNSUPPORTED", 50500),
    ("Code", "VERSION_UNSUPPORTED", 50501),
    ("Code", "VERIFY_FIFO_MESSAGE_UNSUPPORTED", 50502),
    ("Code", "FAILED_TO_CONSUME_MESSAGE", 60000),
    ("Language", "LANGUAGE_UNSPECIFIED", 0),
    ("Language", "JAVA", 1),
    ("Language", "CPP", 2),
    ("Language", "DOT_NET", 3),
    ("Language", "GOLANG", 4),
    ("Language", "RUST", 5),
    ("Language", "PYTHON", 6),
    ("Language", "PHP", 7),
    ("Language", "NODE_JS", 8),
    ("Language", "RUBY", 9),
    ("Language", "OBJECTIVE_C", 10),
    ("Language", "DART", 11),
    ("Language", "KOTLIN", 12),
    ("LiteSubscriptionAction", "PARTIAL_ADD", 0),
    ("LiteSubscriptionAction", "PARTIAL_REMOVE", 1),
    ("LiteSubscriptionAction", "COMPLETE_ADD", 2),
    ("LiteSubscriptionAction", "COMPLETE_REMOVE", 3),
    ("QueryOffsetPolicy", "BEGINNING", 0),
    ("QueryOffsetPolicy", "END", 1),
    ("QueryOffsetPolicy", "TIMESTAMP", 2),
];

/// (rpc, input, output, client streaming, server streaming) of MessagingService, in upstream order.
const RPCS: &[(&str, &str, &str, bool, bool)] = &[
    ("QueryRoute", "QueryRouteRequest", "QueryRouteResponse", false, false),
    ("Heartbeat", "HeartbeatRequest", "HeartbeatResponse", false, false),
    ("SendMessage", "SendMessageRequest", "SendMessageResponse", false, false),
    (
        "QueryAssignment",
        "QueryAssignmentRequest",
        "QueryAssignmentResponse",
        false,
        false,
    ),
    (
        "ReceiveMessage",
        "ReceiveMessageRequest",
        "ReceiveMessageResponse",
        false,
        true,
    ),
    ("AckMessage", "AckMessageRequest", "AckMessageResponse", false, false),
    (
        "ForwardMessageToDeadLetterQueue",
        "ForwardMessageToDeadLetterQueueRequest",
        "ForwardMessageToDeadLetterQueueResponse",
        false,
        false,
    ),
    ("PullMessage", "PullMessageRequest", "PullMessageResponse", false, true),
    (
        "UpdateOffset",
        "UpdateOffsetRequest",
        "UpdateOffsetResponse",
        false,
        false,
    ),
    ("GetOffset", "GetOffsetRequest", "GetOffsetResponse", false, false),
    ("QueryOffset", "QueryOffsetRequest", "QueryOffsetResponse", false, false),
    (
        "EndTransaction",
        "EndTransactionRequest",
        "EndTransactionResponse",
        false,
        false,
    ),
    ("Telemetry", "TelemetryCommand", "TelemetryCommand", true, true),
    (
        "NotifyClientTermination",
        "NotifyClientTerminationRequest",
        "NotifyClientTerminationResponse",
        false,
        false,
    ),
    (
        "ChangeInvisibleDuration",
        "ChangeInvisibleDurationRequest",
        "ChangeInvisibleDurationResponse",
        false,
        false,
    ),
    (
        "RecallMessage",
        "RecallMessageRequest",
        "RecallMessageResponse",
        false,
        false,
    ),
    (
        "SyncLiteSubscription",
        "SyncLiteSubscriptionRequest",
        "SyncLiteSubscriptionResponse",
        false,
        false,
    ),
];

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).expect("FILE_DESCRIPTOR_SET decodes")
}

fn our_files(set: &FileDescriptorSet) -> Vec<&FileDescriptorProto> {
    set.file.iter().filter(|f| f.package() == PACKAGE).collect()
}

/// All messages (nested ones as `Outer.Inner`) of our two files, in declaration order.
fn messages(set: &FileDescriptorSet) -> Vec<(String, &DescriptorProto)> {
    fn walk<'a>(prefix: &str, m: &'a DescriptorProto, out: &mut Vec<(String, &'a DescriptorProto)>) {
        let name = format!("{prefix}{}", m.name());
        for nested in &m.nested_type {
            walk(&format!("{name}."), nested, out);
        }
        out.push((name, m));
    }
    let mut out = Vec::new();
    for file in our_files(set) {
        for m in &file.message_type {
            walk("", m, &mut out);
        }
    }
    out
}

fn is_map_entry(m: &DescriptorProto) -> bool {
    m.options.as_ref().is_some_and(|o| o.map_entry())
}

fn type_name(full: &str) -> String {
    let prefix = format!(".{PACKAGE}.");
    match full.strip_prefix(&prefix) {
        Some(local) => local.to_owned(),
        None => full.trim_start_matches('.').to_owned(),
    }
}

fn base_type(field: &prost_types::FieldDescriptorProto) -> String {
    match field.r#type() {
        Type::Message | Type::Enum => type_name(field.type_name()),
        other => other.as_str_name().trim_start_matches("TYPE_").to_ascii_lowercase(),
    }
}

/// Renders a field's type the way the FIELDS table writes it.
fn render(set: &FileDescriptorSet, owner: &DescriptorProto, field: &prost_types::FieldDescriptorProto) -> String {
    let base = base_type(field);
    if field.r#type() == Type::Message && field.label() == Label::Repeated {
        let entry = messages(set)
            .into_iter()
            .find(|(name, _)| format!(".{PACKAGE}.{name}") == field.type_name())
            .map(|(_, m)| m);
        if let Some(entry) = entry.filter(|m| is_map_entry(m)) {
            return format!("map<{}, {}>", base_type(&entry.field[0]), base_type(&entry.field[1]));
        }
    }
    if field.proto3_optional() {
        format!("optional {base}")
    } else if let Some(index) = field.oneof_index {
        format!("oneof {} {base}", owner.oneof_decl[index as usize].name())
    } else if field.label() == Label::Repeated {
        format!("repeated {base}")
    } else {
        base
    }
}

#[test]
fn files_package_and_imports_match_upstream() {
    let set = descriptor_set();
    let files = our_files(&set);
    let names: Vec<&str> = files.iter().map(|f| f.name()).collect();
    assert_eq!(names, [DEFINITION, SERVICE]);
    for file in &files {
        assert_eq!(file.syntax(), "proto3", "{}", file.name());
    }
    assert_eq!(
        files[0].dependency,
        ["google/protobuf/timestamp.proto", "google/protobuf/duration.proto"]
    );
    assert_eq!(
        files[1].dependency,
        [
            "google/protobuf/duration.proto",
            "google/protobuf/timestamp.proto",
            DEFINITION
        ]
    );
}

#[test]
fn every_upstream_message_exists_and_no_other() {
    let set = descriptor_set();
    let ours: Vec<String> = messages(&set)
        .into_iter()
        .filter(|(_, m)| !is_map_entry(m))
        .map(|(name, _)| name)
        .collect();
    let ours: BTreeSet<&str> = ours.iter().map(String::as_str).collect();
    let upstream: BTreeSet<&str> = ALL_MESSAGES.iter().copied().collect();
    assert_eq!(ours, upstream);
}

#[test]
fn fields_match_upstream() {
    let set = descriptor_set();
    let all = messages(&set);
    let mut expected: BTreeMap<&str, Vec<(String, i32, String)>> = BTreeMap::new();
    for &(message, field, number, ty) in FIELDS {
        expected
            .entry(message)
            .or_default()
            .push((field.to_owned(), number, ty.to_owned()));
    }
    for (message, mut want) in expected {
        let (_, desc) = all
            .iter()
            .find(|(name, _)| name == message)
            .unwrap_or_else(|| panic!("message {message} missing"));
        let mut got: Vec<(String, i32, String)> = desc
            .field
            .iter()
            .map(|f| (f.name().to_owned(), f.number(), render(&set, desc, f)))
            .collect();
        got.sort_by_key(|(_, number, _)| *number);
        want.sort_by_key(|(_, number, _)| *number);
        assert_eq!(got, want, "fields of {message}");
    }
}

#[test]
fn enum_values_match_upstream() {
    let set = descriptor_set();
    let mut got: Vec<(String, String, i32)> = Vec::new();
    for file in our_files(&set) {
        for e in &file.enum_type {
            for v in &e.value {
                got.push((e.name().to_owned(), v.name().to_owned(), v.number()));
            }
        }
    }
    for (name, m) in messages(&set) {
        for e in &m.enum_type {
            for v in &e.value {
                got.push((format!("{name}.{}", e.name()), v.name().to_owned(), v.number()));
            }
        }
    }
    got.sort();
    let mut want: Vec<(String, String, i32)> = ENUM_VALUES
        .iter()
        .map(|&(e, v, n)| (e.to_owned(), v.to_owned(), n))
        .collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn messaging_service_rpcs_match_upstream() {
    let set = descriptor_set();
    let files = our_files(&set);
    let services: Vec<_> = files.iter().flat_map(|f| f.service.iter()).collect();
    assert_eq!(services.len(), 1, "only MessagingService (no admin.proto)");
    assert_eq!(services[0].name(), "MessagingService");
    let got: Vec<(String, String, String, bool, bool)> = services[0]
        .method
        .iter()
        .map(|m| {
            (
                m.name().to_owned(),
                type_name(m.input_type()),
                type_name(m.output_type()),
                m.client_streaming(),
                m.server_streaming(),
            )
        })
        .collect();
    let want: Vec<(String, String, String, bool, bool)> = RPCS
        .iter()
        .map(|&(n, i, o, cs, ss)| (n.to_owned(), i.to_owned(), o.to_owned(), cs, ss))
        .collect();
    assert_eq!(got, want);
}

/// The generated Rust code, not just the descriptor, speaks the same wire format.
#[test]
fn generated_code_encodes_upstream_bytes() {
    use pb::messaging_service_server::SERVICE_NAME;
    assert_eq!(SERVICE_NAME, "apache.rocketmq.v2.MessagingService");

    // Status{code: OK (20000), message: "x"}: tag 1 varint 20000, tag 2 "x".
    let status = pb::Status {
        code: pb::Code::Ok as i32,
        message: "x".into(),
    };
    assert_eq!(status.encode_to_vec(), [0x08, 0xa0, 0x9c, 0x01, 0x12, 0x01, b'x']);

    // ReceiveMessageResponse oneof content = status (field 1, length-delimited).
    let resp = pb::ReceiveMessageResponse {
        content: Some(pb::receive_message_response::Content::Status(status.clone())),
    };
    assert_eq!(resp.encode_to_vec()[..2], [0x0a, 0x07]);

    // SystemProperties.delivery_attempt = 1 is field 16 (two-byte tag 0x80 0x01), explicit presence.
    let props = pb::SystemProperties {
        delivery_attempt: Some(1),
        ..Default::default()
    };
    assert_eq!(props.encode_to_vec(), [0x80, 0x01, 0x01]);

    // Well-known types map to prost_types and round-trip.
    let msg = pb::Message {
        topic: Some(pb::Resource {
            resource_namespace: String::new(),
            name: "t".into(),
        }),
        user_properties: [("k".to_owned(), "v".to_owned())].into(),
        system_properties: Some(pb::SystemProperties {
            message_id: "01".into(),
            body_encoding: pb::Encoding::Identity as i32,
            born_timestamp: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
            invisible_duration: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
            ..Default::default()
        }),
        body: b"hello".to_vec(),
    };
    assert_eq!(pb::Message::decode(msg.encode_to_vec().as_slice()).unwrap(), msg);

    // Enum values the SDKs depend on, via the generated enums.
    assert_eq!(pb::Code::MessageNotFound as i32, 40401);
    assert_eq!(pb::Code::InvalidReceiptHandle as i32, 40013);
    assert_eq!(pb::Code::TooManyRequests as i32, 42900);
    assert_eq!(pb::Permission::ReadWrite as i32, 4);
    assert_eq!(pb::AddressScheme::DomainName as i32, 3);
    assert_eq!(pb::TransactionSource::SourceServerCheck as i32, 2);
}

/// Local-only extra check: whole-descriptor comparison with the upstream files
/// compiled from a mirror of apache/rocketmq-apis (git dir in
/// `ROCKETMQ_APIS_GIT`, default `/work/.mirror/apache+rocketmq-apis/repo`), at
/// 68c2cc9. Everything except comments and language options must be equal.
/// Skips when the mirror is absent. Run with `cargo test -p raftmq-proto -- --ignored`.
#[test]
#[ignore = "needs a local apache/rocketmq-apis mirror"]
fn upstream_full_diff() {
    use std::path::PathBuf;
    use std::process::Command;

    let git_dir =
        std::env::var("ROCKETMQ_APIS_GIT").unwrap_or_else(|_| "/work/.mirror/apache+rocketmq-apis/repo".to_owned());
    if !PathBuf::from(&git_dir).exists() {
        eprintln!("skipped: no apache/rocketmq-apis mirror at {git_dir}");
        return;
    }
    let root = std::env::temp_dir().join(format!("raftmq-rocketmq-apis-{}", std::process::id()));
    let dir = root.join("apache/rocketmq/v2");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["definition.proto", "service.proto"] {
        let out = Command::new("git")
            .args(["-C", &git_dir, "show", &format!("68c2cc9:apache/rocketmq/v2/{file}")])
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git show {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(dir.join(file), out.stdout).unwrap();
    }
    let descriptor = root.join("upstream.bin");
    let status = Command::new(protoc_bin_vendored::protoc_bin_path().unwrap())
        .arg("-I")
        .arg(&root)
        .arg("-I")
        .arg(protoc_bin_vendored::include_path().unwrap())
        .arg("--include_imports")
        .arg("-o")
        .arg(&descriptor)
        .args([DEFINITION, SERVICE])
        .status()
        .expect("run protoc");
    assert!(status.success());
    let upstream = FileDescriptorSet::decode(std::fs::read(&descriptor).unwrap().as_slice()).unwrap();
    let _ = std::fs::remove_dir_all(&root);

    // Comments live in source info; java/csharp options are not wire format.
    fn strip(set: &FileDescriptorSet) -> Vec<FileDescriptorProto> {
        fn strip_message(m: &mut DescriptorProto) {
            if !is_map_entry(m) {
                m.options = None;
            }
            m.nested_type.iter_mut().for_each(strip_message);
        }
        set.file
            .iter()
            .filter(|f| f.package() == PACKAGE)
            .cloned()
            .map(|mut f| {
                f.source_code_info = None;
                f.options = None;
                f.message_type.iter_mut().for_each(strip_message);
                f
            })
            .collect()
    }
    let (ours, theirs) = (strip(&descriptor_set()), strip(&upstream));
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a, b, "{} differs from upstream", a.name());
    }
}
