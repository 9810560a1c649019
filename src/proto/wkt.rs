//! `google.protobuf.Timestamp` with protobuf's canonical JSON form (`...Z`, 0, 3, 6 or 9
//! fractional digits), which strict clients such as connect-web require.

use chrono::{DateTime, SecondsFormat};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Seconds and nanoseconds since the Unix epoch, as `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Timestamp {
    /// Seconds since the epoch (negative before it).
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Non-negative nanoseconds within the second.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let nanos = u32::try_from(self.nanos).map_err(serde::ser::Error::custom)?;
        let time = DateTime::from_timestamp(self.seconds, nanos)
            .ok_or_else(|| serde::ser::Error::custom("timestamp out of range"))?;
        serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let time = DateTime::parse_from_rfc3339(&text).map_err(serde::de::Error::custom)?;
        Ok(Timestamp {
            seconds: time.timestamp(),
            nanos: i32::try_from(time.timestamp_subsec_nanos())
                .map_err(serde::de::Error::custom)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json() {
        for (seconds, nanos, want) in [
            (0, 0, "\"1970-01-01T00:00:00Z\""),
            (
                1_700_000_000,
                813_699_380,
                "\"2023-11-14T22:13:20.813699380Z\"",
            ),
            (1_700_000_000, 500_000_000, "\"2023-11-14T22:13:20.500Z\""),
            (1_700_000_000, 1_000, "\"2023-11-14T22:13:20.000001Z\""),
        ] {
            let ts = Timestamp { seconds, nanos };
            let json = serde_json::to_string(&ts).expect("serialize");
            assert_eq!(json, want);
            assert_eq!(serde_json::from_str::<Timestamp>(&json).expect("parse"), ts);
        }
        let offset: Timestamp =
            serde_json::from_str("\"2023-11-14T23:13:20+01:00\"").expect("offset");
        assert_eq!(offset.seconds, 1_700_000_000);
    }
}
