//! Faults the simulated cloud injects call by call, for the fault suite (`tests/faults.rs`) and
//! for watching cluster-autoscaler deal with a misbehaving cloud.
//!
//! Nothing here happens unless asked for: a `[clouds.NAME.faults]` table in the configuration,
//! or [`FaultPlan::push`]/[`FaultPlan::always`] on [`Simulated::faults`](super::Simulated::faults)
//! at run time. Each operation has a queue of faults, one consumed per call; a call that finds
//! its queue empty (and no `always` fault) behaves exactly as the simulated cloud documents.
//!
//! ```toml
//! [clouds.sim.faults]
//! create = ["lost_response", "ok", "fail_late"]   # 1st create: lost answer; 3rd: late failure
//! delete = ["unavailable"]
//! ```

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use crate::config::{Problems, Section};

/// One injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No fault: the call behaves normally (a placeholder in a configured sequence).
    Ok,
    /// A 5xx before the cloud does anything.
    Unavailable,
    /// The call hangs before the cloud does anything, until the caller's timeout.
    Hang,
    /// The cloud acts, then the answer is lost: the call fails with `Unavailable`.
    LostResponse,
    /// The cloud acts, then the call hangs until the caller's timeout.
    HangAfter,
    /// Create: the machine appears, then the create fails late (a start task failed) and the
    /// driver removes it.
    FailLate,
    /// Create: as `FailLate`, but the driver cannot remove it: it stays, listed as failed.
    FailLateLeaked,
    /// List: the answer is the cloud as it was when the call started, returned `list_latency`
    /// later (whatever creates and deletes finished meanwhile).
    Stale,
}

impl Fault {
    /// Configuration names, in the order of the variants.
    pub const NAMES: &[(&str, Fault)] = &[
        ("ok", Fault::Ok),
        ("unavailable", Fault::Unavailable),
        ("hang", Fault::Hang),
        ("lost_response", Fault::LostResponse),
        ("hang_after", Fault::HangAfter),
        ("fail_late", Fault::FailLate),
        ("fail_late_leaked", Fault::FailLateLeaked),
        ("stale", Fault::Stale),
    ];

    fn parse(name: &str) -> Option<Fault> {
        Fault::NAMES.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    fn fits(self, op: Op) -> bool {
        match self {
            Fault::FailLate | Fault::FailLateLeaked => op == Op::Create,
            Fault::Stale => op == Op::List,
            _ => true,
        }
    }
}

/// The driver call a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    List,
    Create,
    Delete,
    Mark,
    /// Warm pools: stopping a machine into the pool, starting one out of it.
    Stop,
    Start,
}

impl Op {
    const ALL: [(&str, Op); 6] = [
        ("list", Op::List),
        ("create", Op::Create),
        ("delete", Op::Delete),
        ("mark", Op::Mark),
        ("stop", Op::Stop),
        ("start", Op::Start),
    ];
}

/// Per-operation fault queues. Written by configuration and by tests; read by each call.
#[derive(Debug, Default)]
pub struct FaultPlan {
    queues: Mutex<HashMap<Op, VecDeque<Fault>>>,
    always: Mutex<HashMap<Op, Fault>>,
}

impl FaultPlan {
    /// Reads a `faults` table: one array of fault names per operation, in call order.
    pub fn parse(s: &mut Section<'_>, p: &mut Problems) -> Vec<(Op, Fault)> {
        let mut plan = Vec::new();
        for (key, op) in Op::ALL {
            for (i, name) in s.string_list(key, p).into_iter().enumerate() {
                match Fault::parse(&name) {
                    Some(f) if f.fits(op) => plan.push((op, f)),
                    Some(_) => p.push(format!("{}[{i}]", s.key_path(key)), format!("{name:?} does not apply to {key}")),
                    None => {
                        let known: Vec<_> = Fault::NAMES.iter().map(|(n, _)| *n).collect();
                        p.push(
                            format!("{}[{i}]", s.key_path(key)),
                            format!("unknown fault {name:?} (known: {})", known.join(", ")),
                        )
                    }
                }
            }
        }
        plan
    }

    /// Queues `fault` for the next call of `op` that has none queued before it.
    pub fn push(&self, op: Op, fault: Fault) {
        assert!(fault.fits(op), "{fault:?} does not apply to {op:?}");
        self.queues.lock().unwrap_or_else(|e| e.into_inner()).entry(op).or_default().push_back(fault);
    }

    /// Injects `fault` into every call of `op` whose queue is empty, until cleared with `None`.
    pub fn always(&self, op: Op, fault: Option<Fault>) {
        let mut always = self.always.lock().unwrap_or_else(|e| e.into_inner());
        match fault {
            Some(f) => {
                assert!(f.fits(op), "{f:?} does not apply to {op:?}");
                always.insert(op, f);
            }
            None => {
                always.remove(&op);
            }
        }
    }

    /// The fault for this call of `op`.
    pub(super) fn next(&self, op: Op) -> Fault {
        let queued = self.queues.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&op).and_then(VecDeque::pop_front);
        queued.or_else(|| self.always.lock().unwrap_or_else(|e| e.into_inner()).get(&op).copied()).unwrap_or(Fault::Ok)
    }
}

/// Waits forever: the caller's timeout ends the call.
pub(super) async fn hang<T>() -> T {
    std::future::pending().await
}
