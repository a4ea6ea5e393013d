//! A subscription's filter as the broker evaluates it on pull, push and POP: a
//! tag expression or a SQL92 expression ([`crate::sql92`]), with the ConsumeQueue
//! tag-hash prefilter each can use.

use raftmq_proto::v1 as pb;

use crate::api_error::ApiError;
use crate::sql92::SqlFilter;
use crate::validate::TagFilter;

/// Longest filter expression accepted (the SQL92 parser has the same bound).
const MAX_EXPRESSION_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub enum MessageFilter {
    Tag(TagFilter),
    Sql(SqlFilter),
}

impl MessageFilter {
    /// Parses `expr` as `filter_type` (a `FilterType` value) says; a malformed
    /// expression is INVALID_ARGUMENT naming what (and for SQL92 where) is wrong.
    pub fn parse(filter_type: i32, expr: &str) -> Result<MessageFilter, ApiError> {
        if expr.len() > MAX_EXPRESSION_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "filter expression of {} bytes exceeds the limit of {MAX_EXPRESSION_BYTES}",
                expr.len()
            )));
        }
        match pb::FilterType::try_from(filter_type) {
            Ok(pb::FilterType::Tag) => Ok(MessageFilter::Tag(TagFilter::parse(expr)?)),
            Ok(pb::FilterType::Sql92) => SqlFilter::parse(expr)
                .map(MessageFilter::Sql)
                .map_err(|e| ApiError::InvalidArgument(format!("{e} (expression {expr:?})"))),
            Err(_) => Err(ApiError::InvalidArgument(format!(
                "filter_type {filter_type} is not TAG (0) or SQL92 (1)"
            ))),
        }
    }

    /// The ConsumeQueue tag hashes that can match (`None`: any tag may).
    pub fn tag_hashes(&self) -> Option<Vec<u64>> {
        match self {
            MessageFilter::Tag(t) => t.tag_hashes(),
            MessageFilter::Sql(s) => s
                .required_tags()
                .map(|tags| tags.iter().map(|t| raftmq_raft_store::command::tag_hash(t)).collect()),
        }
    }

    pub fn matches(&self, tag: &str, properties: &[(String, String)]) -> bool {
        match self {
            MessageFilter::Tag(t) => t.matches(tag),
            MessageFilter::Sql(s) => s.matches(tag, properties),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_filters_prefilter_by_tag_and_match_properties() {
        let f = MessageFilter::parse(1, "TAGS = 'a' AND n > 3").unwrap();
        assert_eq!(f.tag_hashes().map(|h| h.len()), Some(1));
        let props = vec![("n".to_owned(), "5".to_owned())];
        assert!(f.matches("a", &props));
        assert!(!f.matches("b", &props));
        assert!(!f.matches("a", &[("n".to_owned(), "x".to_owned())]));
    }

    #[test]
    fn malformed_sql_names_the_position() {
        let err = MessageFilter::parse(1, "a > ").unwrap_err();
        assert!(
            matches!(&err, ApiError::InvalidArgument(m) if m.contains("position")),
            "{err}"
        );
        assert!(MessageFilter::parse(7, "*").is_err());
    }
}
