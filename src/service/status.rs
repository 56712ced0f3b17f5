//! The one place errors become gRPC statuses.
//!
//! | error | code | why |
//! |---|---|---|
//! | unknown group | NOT_FOUND | CA asked for something that does not exist |
//! | bad delta, size past max, node not in group | INVALID_ARGUMENT | the request itself is wrong |
//! | delete below min size | FAILED_PRECONDITION | valid request, wrong moment |
//! | stale state | UNAVAILABLE | retry later; CA's loop tries again next scan |
//! | not the leader (leader election) | UNAVAILABLE | a Service routes to the ready leader; retry |
//! | cloud: quota / capacity | RESOURCE_EXHAUSTED | |
//! | cloud: credentials, rejected request | FAILED_PRECONDITION | fix the configuration |
//! | cloud: unreachable, 5xx, rate limited, timeout | UNAVAILABLE | transient |
//! | cloud: not found | NOT_FOUND | |
//! | cloud: anything else | UNKNOWN | |
//!
//! Messages never carry secrets: driver errors are built from cloud answers and names only.

use tonic::{Code, Status};

use crate::{driver, state};

impl From<state::Error> for Status {
    fn from(e: state::Error) -> Status {
        use state::Error as E;
        let code = match &e {
            E::UnknownGroup(_) => Code::NotFound,
            E::NonPositiveDelta { .. }
            | E::AboveMax { .. }
            | E::NonNegativeDelta { .. }
            | E::WouldRemoveExisting { .. }
            | E::NotInGroup { .. } => Code::InvalidArgument,
            E::BelowMin { .. } => Code::FailedPrecondition,
            E::Stale { .. } | E::NotListed { .. } | E::NotLeader { .. } => Code::Unavailable,
            E::Driver { source, .. } => driver_code(source),
        };
        Status::new(code, e.to_string())
    }
}

/// The gRPC code for a cloud error.
pub fn driver_code(e: &driver::Error) -> Code {
    use driver::Error as E;
    match e {
        E::NotFound(_) => Code::NotFound,
        E::OutOfResources(_) => Code::ResourceExhausted,
        E::Unauthorized(_) | E::InvalidRequest(_) => Code::FailedPrecondition,
        E::Unavailable(_) | E::RateLimited { .. } | E::Timeout(_) => Code::Unavailable,
        E::Other(_) => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_mistakes_are_invalid_arguments_and_cloud_outages_are_unavailable() {
        let s = Status::from(state::Error::AboveMax { group: "g".into(), current: 3, delta: 2, max: 4 });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("current size 3") && s.message().contains("max size 4"));
        assert_eq!(Status::from(state::Error::UnknownGroup("\"x\"".into())).code(), Code::NotFound);
        let cloud = |source| state::Error::Driver { cloud: "c".into(), source };
        assert_eq!(Status::from(cloud(driver::Error::Unavailable("down".into()))).code(), Code::Unavailable);
        assert_eq!(Status::from(cloud(driver::Error::OutOfResources("quota".into()))).code(), Code::ResourceExhausted);
        assert_eq!(Status::from(cloud(driver::Error::Unauthorized("401".into()))).code(), Code::FailedPrecondition);
    }
}
