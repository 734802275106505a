//! Conversions between Kubernetes timestamps (k8s-openapi's jiff), the RFC 3339 text of
//! vmdisk's own status fields and annotations, and chrono, which the controllers' decisions
//! compute with.

use chrono::{DateTime, Utc};

pub fn to_timestamp(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros()).unwrap_or_default()
}

pub fn from_timestamp(t: &k8s_openapi::jiff::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.as_microsecond()).unwrap_or_default()
}

/// A time vmdisk wrote as RFC 3339 text (status fields, annotations); `None` when it is not one.
pub fn parse_rfc3339(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_to_the_microsecond() {
        let t = DateTime::parse_from_rfc3339("2026-11-24T10:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(from_timestamp(&to_timestamp(t)), t);
    }
}
