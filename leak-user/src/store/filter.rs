//! Which kills `/kills` returns: its query parameters, each validated, and the same selection
//! over the kills in memory when there is no store on disk.

use crate::model::{kill::Kill, time::parse_rfc3339};

/// The most kills one request returns.
pub const MAX_LIMIT: usize = 10_000;

/// Longest accepted value of a name filter (cgroup paths included).
const MAX_NAME: usize = 4096;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KillFilter {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    /// The victim's cgroup path, as `/kills` prints it.
    pub cgroup: Option<String>,
    pub since_unix_ns: Option<u128>,
    pub until_unix_ns: Option<u128>,
    pub limit: usize,
}

/// A query parameter that cannot be used, and why: the 400's message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("query parameter `{name}`: {reason}")]
pub struct BadParameter {
    pub name: String,
    pub reason: String,
}

fn bad(name: &str, reason: impl Into<String>) -> BadParameter {
    BadParameter {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

/// A time: RFC 3339 (`2026-11-30T06:00:00Z`) or Unix seconds (`1764482400`, `1764482400.5`).
fn time(name: &str, value: &str) -> Result<u128, BadParameter> {
    // Unix seconds, to the nanosecond: whole and fractional parts read as integers (a float
    // would round a nanosecond timestamp).
    let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
    let digits = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if digits(whole) && (fraction.is_empty() || digits(fraction)) {
        let seconds: u128 = whole
            .parse()
            .ok()
            .filter(|&s| s < 100_000_000_000)
            .ok_or_else(|| bad(name, format!("{value:?} is out of range")))?;
        let mut nanos: u128 = 0;
        for (i, digit) in fraction.bytes().take(9).enumerate() {
            nanos += u128::from(digit - b'0') * 10u128.pow(8 - i as u32);
        }
        return Ok(seconds * 1_000_000_000 + nanos);
    }
    parse_rfc3339(value).ok_or_else(|| {
        bad(
            name,
            format!("{value:?} is neither RFC 3339 (2026-11-30T06:00:00Z) nor Unix seconds"),
        )
    })
}

impl KillFilter {
    /// From the query's parameters; an unknown, repeated or malformed one is an error.
    pub fn from_query<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        default_limit: usize,
    ) -> Result<Self, BadParameter> {
        let mut filter = Self {
            limit: default_limit.min(MAX_LIMIT),
            ..Self::default()
        };
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in pairs {
            if seen.contains(&name) {
                return Err(bad(name, "given more than once"));
            }
            seen.push(name);
            let text = |slot: &mut Option<String>| -> Result<(), BadParameter> {
                if value.len() > MAX_NAME {
                    return Err(bad(name, format!("longer than {MAX_NAME} bytes")));
                }
                *slot = Some(value.to_owned());
                Ok(())
            };
            match name {
                "namespace" => text(&mut filter.namespace)?,
                "pod" => text(&mut filter.pod)?,
                "container" => text(&mut filter.container)?,
                "cgroup" => text(&mut filter.cgroup)?,
                "since" => filter.since_unix_ns = Some(time(name, value)?),
                "until" => filter.until_unix_ns = Some(time(name, value)?),
                "limit" => {
                    filter.limit = match value.parse::<usize>() {
                        Ok(limit) if limit <= MAX_LIMIT => limit,
                        _ => {
                            return Err(bad(
                                name,
                                format!("{value:?} is not a number from 0 to {MAX_LIMIT}"),
                            ))
                        }
                    }
                }
                other => {
                    return Err(bad(
                        other,
                        "unknown (namespace, pod, container, cgroup, since, until, limit)",
                    ))
                }
            }
        }
        if let (Some(since), Some(until)) = (filter.since_unix_ns, filter.until_unix_ns) {
            if since > until {
                return Err(bad("until", "is before `since`"));
            }
        }
        Ok(filter)
    }

    pub fn matches(&self, kill: &Kill) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        is(&self.namespace, &kill.names.namespace)
            && is(&self.pod, &kill.names.pod)
            && is(&self.container, &kill.names.container)
            && is(&self.cgroup, &kill.cgroup)
            && self
                .since_unix_ns
                .is_none_or(|since| kill.timestamp_unix_ns >= since)
            && self
                .until_unix_ns
                .is_none_or(|until| kill.timestamp_unix_ns <= until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &[(&str, &str)]) -> Result<KillFilter, BadParameter> {
        KillFilter::from_query(query.iter().copied(), 1000)
    }

    #[test]
    fn each_parameter_is_validated_by_name() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("limit", "lots")], "limit"),
            (&[("limit", "-1")], "limit"),
            (&[("limit", "10001")], "limit"),
            (&[("since", "yesterday")], "since"),
            (&[("until", "-5")], "until"),
            (&[("since", "200"), ("until", "100")], "until"),
            (&[("pod", "a"), ("pod", "b")], "pod"),
            (&[("colour", "red")], "colour"),
        ];
        for (query, name) in cases {
            let err = parse(query).expect_err("rejected");
            assert_eq!(err.name, *name, "{query:?}: {err}");
        }
    }

    #[test]
    fn times_are_rfc3339_or_unix_seconds() {
        let filter =
            parse(&[("since", "2026-11-30T06:00:00Z"), ("until", "1796018400.5")]).expect("valid");
        assert_eq!(filter.since_unix_ns, Some(1_796_018_400_000_000_000));
        assert_eq!(filter.until_unix_ns, Some(1_796_018_400_500_000_000));
        assert_eq!(filter.limit, 1000);
    }
}
