//! The fleet against a cloud the test scripts call by call, under paused time: every
//! interleaving of a listing with the steps of a create and of a delete, and what a restart
//! keeps.

use std::collections::{BTreeMap, VecDeque};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::*;
use crate::driver::{
    Driver,
    simulated::{
        Settings, Simulated,
        faults::{Fault, Op},
    },
};

// === a cloud the test answers for ===

/// A call the fleet made and the test has not answered yet.
#[derive(Debug)]
enum Call {
    Create { name: String, reply: oneshot::Sender<driver::Result<Machine>> },
    Delete { machine: MachineRef, reply: oneshot::Sender<driver::Result<()>> },
}

/// A cloud whose machines the test puts and removes by hand and whose create and delete calls
/// wait until the test answers them. `mark_deleting` acts at once, as a tag update does.
#[derive(Debug, Default)]
struct Scripted {
    cloud: Mutex<BTreeMap<String, Machine>>,
    calls: Mutex<VecDeque<Call>>,
    /// While set, listings fail (the cloud is down).
    down: std::sync::atomic::AtomicBool,
}

fn cloud_id(name: &str) -> String {
    format!("id-{name}")
}

impl Scripted {
    fn put(&self, name: &str, state: MachineState) {
        let m = Machine { group: "g".into(), name: name.into(), id: cloud_id(name), state };
        self.cloud.lock().unwrap().insert(name.into(), m);
    }

    fn remove(&self, name: &str) {
        self.cloud.lock().unwrap().remove(name);
    }

    fn names(&self) -> Vec<String> {
        self.cloud.lock().unwrap().keys().cloned().collect()
    }

    fn state_of(&self, name: &str) -> Option<MachineState> {
        self.cloud.lock().unwrap().get(name).map(|m| m.state.clone())
    }

    /// What a listing taken now returns.
    fn listing(&self) -> Vec<Machine> {
        self.cloud.lock().unwrap().values().cloned().collect()
    }

    fn try_next(&self) -> Option<Call> {
        self.calls.lock().unwrap().pop_front()
    }

    async fn next(&self) -> Call {
        for _ in 0..1000 {
            if let Some(call) = self.try_next() {
                return call;
            }
            tokio::task::yield_now().await;
        }
        panic!("the fleet made no cloud call");
    }

    async fn next_create(&self) -> (String, oneshot::Sender<driver::Result<Machine>>) {
        match self.next().await {
            Call::Create { name, reply } => (name, reply),
            other => panic!("expected a create, got {other:?}"),
        }
    }

    async fn next_delete(&self) -> (MachineRef, oneshot::Sender<driver::Result<()>>) {
        match self.next().await {
            Call::Delete { machine, reply } => (machine, reply),
            other => panic!("expected a delete, got {other:?}"),
        }
    }

    /// Answers every delete waiting now as the cloud would: removed, or not found.
    fn answer_deletes(&self) -> usize {
        let mut n = 0;
        while let Some(call) = self.try_next() {
            match call {
                Call::Delete { machine, reply } => {
                    let existed = self.cloud.lock().unwrap().remove(&machine.name).is_some();
                    let _ = reply.send(if existed { Ok(()) } else { Err(driver::Error::NotFound(machine.id)) });
                    n += 1;
                }
                Call::Create { name, .. } => panic!("unexpected create of {name}"),
            }
        }
        n
    }
}

#[async_trait]
impl Driver for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    async fn list(&self) -> driver::Result<Vec<Machine>> {
        if self.down.load(Ordering::SeqCst) {
            return Err(driver::Error::Unavailable("503".into()));
        }
        Ok(self.listing())
    }

    async fn create(&self, _group: &str, name: &str) -> driver::Result<Machine> {
        let (reply, answer) = oneshot::channel();
        self.calls.lock().unwrap().push_back(Call::Create { name: name.into(), reply });
        answer.await.unwrap_or_else(|_| Err(driver::Error::Other("test dropped the call".into())))
    }

    async fn delete(&self, machine: &MachineRef) -> driver::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.calls.lock().unwrap().push_back(Call::Delete { machine: machine.clone(), reply });
        answer.await.unwrap_or_else(|_| Err(driver::Error::Other("test dropped the call".into())))
    }

    async fn mark_deleting(&self, machine: &MachineRef) -> driver::Result<()> {
        match self.cloud.lock().unwrap().get_mut(&machine.name) {
            Some(m) => {
                m.state = MachineState::Deleting;
                Ok(())
            }
            None => Err(driver::Error::NotFound(machine.id.clone())),
        }
    }

    async fn check(&self) -> driver::Result<()> {
        Ok(())
    }
}

// === helpers ===

fn config(min_size: i32) -> Config {
    let text = format!(
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n\
         [groups.g]\ncloud = \"sim\"\nmin_size = {min_size}\nmax_size = 5\nprovider_id = \"test:///{{id}}\"\n"
    );
    Config::parse(&text, "test", std::path::Path::new(".")).unwrap()
}

fn scripted(min_size: i32) -> (Arc<Fleet>, Arc<Scripted>) {
    let d = Arc::new(Scripted::default());
    (Fleet::new(&config(min_size), vec![Arc::clone(&d) as SharedDriver]), d)
}

/// A second process over the same cloud: nothing kept but what the cloud holds.
fn restart(d: &Arc<Scripted>, min_size: i32) -> Arc<Fleet> {
    Fleet::new(&config(min_size), vec![Arc::clone(d) as SharedDriver])
}

/// (provider id, phase, error code) of every instance of the only group.
fn instances(f: &Fleet) -> Vec<(String, &'static str, Option<String>)> {
    let mut out = Vec::new();
    f.for_each_instance(0, |id, phase| {
        let (name, code) = match phase {
            InstancePhase::Creating => ("creating", None),
            InstancePhase::Running => ("running", None),
            InstancePhase::Deleting => ("deleting", None),
            InstancePhase::Failed(failure) => ("failed", Some(failure.code.clone())),
        };
        out.push((id.to_owned(), name, code));
    });
    out
}

fn phases(f: &Fleet) -> Vec<&'static str> {
    instances(f).into_iter().map(|(_, p, _)| p).collect()
}

/// Lets background tasks run until they wait on something.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Moves paused time on, so that the next event is strictly later than the last.
async fn step() {
    tokio::time::advance(Duration::from_millis(1)).await;
}

/// Applies a listing taken now.
fn list_now(f: &Arc<Fleet>, d: &Scripted) {
    f.reconcile_cloud(0, d.listing(), Instant::now());
}

fn pid(name: &str) -> String {
    format!("test:///{}", cloud_id(name))
}

// === the simulated cloud ===

fn simulated() -> (Arc<Fleet>, Arc<Simulated>) {
    let text =
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 5\n";
    let config = Config::parse(text, "test", std::path::Path::new(".")).unwrap();
    let sim = Arc::new(Simulated::new("t", Settings::default()).unwrap());
    (Fleet::new(&config, vec![Arc::clone(&sim) as SharedDriver]), sim)
}

#[tokio::test]
async fn a_listing_older_than_a_finished_create_does_not_drop_the_machine() {
    let (f, sim) = simulated();
    f.reconcile_cloud(0, Vec::new(), Instant::now());
    let stale_listing_started = Instant::now();
    let stale = sim.list().await.unwrap(); // empty: taken before the create
    f.increase(0, 1).unwrap();
    f.tasks().close();
    f.tasks().wait().await;
    f.reconcile_cloud(0, stale, stale_listing_started);
    assert_eq!(f.target_size(0), 1);
    assert_eq!(phases(&f), ["running"]);
    // A listing taken after the create sees it too.
    f.reconcile_cloud(0, sim.list().await.unwrap(), Instant::now());
    assert_eq!(f.target_size(0), 1);
}

#[tokio::test]
async fn a_listing_older_than_a_finished_delete_does_not_bring_the_machine_back() {
    let (f, sim) = simulated();
    f.reconcile_cloud(0, Vec::new(), Instant::now());
    f.increase(0, 2).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.reconcile_cloud(0, sim.list().await.unwrap(), Instant::now());
    let victim = instances(&f)[0].0.clone();
    let stale_listing_started = Instant::now();
    let stale = sim.list().await.unwrap(); // still has the victim
    f.delete_nodes(0, &[&victim]).await.unwrap();
    f.tasks().close();
    f.tasks().wait().await;
    f.reconcile_cloud(0, stale, stale_listing_started);
    assert_eq!(f.target_size(0), 1);
    assert!(instances(&f).iter().all(|(id, _, _)| *id != victim));
    assert_eq!(f.group_of(&victim), None);
    // A machine that vanished from the cloud on its own is dropped by the next listing.
    let survivor = instances(&f)[0].0.clone();
    f.reconcile_cloud(0, Vec::new(), Instant::now());
    assert_eq!(f.target_size(0), 0);
    assert_eq!(f.group_of(&survivor), None);
}

// === failed creates stay reported until cluster-autoscaler deletes them ===

#[tokio::test(start_paused = true)]
async fn a_create_that_fails_after_a_listing_saw_it_stays_failed_until_ca_deletes_it() {
    let (f, d) = scripted(0);
    list_now(&f, &d);
    f.increase(0, 1).unwrap();
    let (name, reply) = d.next_create().await;
    d.put(&name, MachineState::Creating);
    step().await;
    list_now(&f, &d); // sees the machine while its create is in flight
    step().await;
    d.remove(&name); // the driver cleans up after a late failure
    reply.send(Err(driver::Error::Other("start task failed".into()))).unwrap();
    settle().await;
    step().await;
    list_now(&f, &d); // the cloud no longer has it
    assert_eq!(instances(&f), [(pid(&name), "failed", Some("OTHER".into()))]);
    assert_eq!(f.target_size(0), 1, "the target must not shrink by itself");
    step().await;
    list_now(&f, &d);
    assert_eq!(phases(&f), ["failed"]);

    f.delete_nodes(0, &[&pid(&name)]).await.unwrap();
    assert_eq!(f.target_size(0), 0);
    settle().await;
    d.answer_deletes();
    settle().await;
    f.delete_nodes(0, &[&pid(&name)]).await.expect("a repeated delete is a no-op");
    step().await;
    list_now(&f, &d);
    assert!(instances(&f).is_empty());
    f.delete_nodes(0, &[&pid(&name)]).await.expect("a repeated delete is a no-op");
}

#[tokio::test(start_paused = true)]
async fn a_listing_never_turns_a_failed_create_into_a_running_machine() {
    let (f, d) = scripted(0);
    list_now(&f, &d);
    f.increase(0, 1).unwrap();
    let (name, reply) = d.next_create().await;
    d.put(&name, MachineState::Running); // the VM runs, but never joined: cleanup failed too
    reply.send(Err(driver::Error::Timeout("guest agent did not answer".into()))).unwrap();
    settle().await;
    step().await;
    list_now(&f, &d);
    assert_eq!(instances(&f), [(pid(&name), "failed", Some("TIMEOUT".into()))]);

    f.delete_nodes(0, &[&pid(&name)]).await.unwrap();
    settle().await;
    assert_eq!(d.answer_deletes(), 1);
    settle().await;
    step().await;
    list_now(&f, &d);
    assert!(instances(&f).is_empty());
    assert!(d.names().is_empty(), "the failed machine was deleted");
}

#[tokio::test(start_paused = true)]
async fn a_create_that_timed_out_after_the_cloud_made_the_machine_leaks_nothing() {
    let (f, d) = scripted(0);
    list_now(&f, &d);
    f.increase(0, 1).unwrap();
    let (name, reply) = d.next_create().await;
    d.put(&name, MachineState::Creating); // the cloud made it; no listing has seen it yet
    reply.send(Err(driver::Error::Timeout("create did not finish".into()))).unwrap();
    settle().await;
    let failed = instances(&f)[0].0.clone();
    assert_eq!(phases(&f), ["failed"]);
    f.delete_nodes(0, &[&failed]).await.unwrap();
    assert_eq!(f.target_size(0), 0);
    step().await;
    list_now(&f, &d); // finds the machine the create left behind
    settle().await;
    assert_eq!(d.answer_deletes(), 1, "the leftover is deleted");
    settle().await;
    step().await;
    list_now(&f, &d);
    assert!(instances(&f).is_empty(), "{:?}", instances(&f));
    assert!(d.names().is_empty());
    assert_eq!(f.target_size(0), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_nobody_deletes_is_dropped_after_the_retention() {
    let (f, d) = scripted(0);
    list_now(&f, &d);
    f.increase(0, 1).unwrap();
    let (_, reply) = d.next_create().await;
    reply.send(Err(driver::Error::OutOfResources("quota".into()))).unwrap();
    settle().await;
    tokio::time::advance(FAILED_CREATE_RETENTION - Duration::from_secs(1)).await;
    list_now(&f, &d);
    assert_eq!(phases(&f), ["failed"]);
    tokio::time::advance(Duration::from_secs(2)).await;
    list_now(&f, &d);
    assert!(instances(&f).is_empty());
    assert_eq!(f.target_size(0), 0);
}

#[tokio::test(start_paused = true)]
async fn deleting_a_failed_create_again_is_a_no_op() {
    let (f, d) = scripted(0);
    list_now(&f, &d);
    f.increase(0, 1).unwrap();
    let (_, reply) = d.next_create().await;
    reply.send(Err(driver::Error::OutOfResources("quota".into()))).unwrap();
    settle().await;
    let failed = instances(&f)[0].0.clone();
    f.delete_nodes(0, &[&failed]).await.unwrap();
    f.delete_nodes(0, &[&failed]).await.expect("the second delete is a no-op");
    step().await;
    list_now(&f, &d);
    f.delete_nodes(0, &[&failed]).await.expect("and so is one after a listing");
    assert_eq!(f.target_size(0), 0);
}

// === sizes ===

#[tokio::test(start_paused = true)]
async fn decrease_never_takes_the_target_below_min_size() {
    let (f, d) = scripted(2);
    list_now(&f, &d);
    f.increase(0, 3).unwrap();
    assert!(matches!(f.decrease(0, -2), Err(Error::BelowMin { .. })));
    assert_eq!(f.target_size(0), 3);
    f.decrease(0, -1).unwrap();
    assert_eq!(f.target_size(0), 2);
}

#[tokio::test(start_paused = true)]
async fn increase_before_the_first_listing_is_refused() {
    let (f, d) = scripted(0);
    for i in 0..4 {
        d.put(&format!("m{i}"), MachineState::Running);
    }
    // Restarted with 4 machines in the cloud, max 5: not yet listed.
    assert!(matches!(f.increase(0, 4), Err(Error::NotListed { .. })));
    list_now(&f, &d);
    assert!(matches!(f.increase(0, 2), Err(Error::AboveMax { .. })));
    f.increase(0, 1).unwrap();
    assert_eq!(f.target_size(0), 5);
}

// === every interleaving of a listing with a create ===

#[derive(Clone, Copy, Debug, PartialEq)]
enum CreateEnd {
    /// The cloud makes it; the create returns it.
    Ok,
    /// The cloud makes it; the create fails late and the driver removes it.
    FailsCleaned,
    /// The cloud makes it; the create times out and the machine stays.
    FailsLeft,
    /// The cloud refuses before making anything.
    Refused,
}

impl CreateEnd {
    fn code(self) -> Option<&'static str> {
        match self {
            CreateEnd::Ok => None,
            CreateEnd::FailsCleaned => Some("OTHER"),
            CreateEnd::FailsLeft => Some("TIMEOUT"),
            CreateEnd::Refused => Some("OUT_OF_RESOURCES"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum CreateStep {
    Increase,
    CloudMakesIt,
    CaDeletesIt,
    Returns,
}

/// Plays cluster-autoscaler's side until the dust settles: list, delete failed instances,
/// answer the cloud's deletes.
async fn ca_rounds(f: &Arc<Fleet>, d: &Scripted) {
    for _ in 0..4 {
        step().await;
        list_now(f, d);
        settle().await;
        let failed: Vec<String> =
            instances(f).into_iter().filter(|(_, p, _)| *p == "failed").map(|(id, _, _)| id).collect();
        if !failed.is_empty() {
            let ids: Vec<&str> = failed.iter().map(String::as_str).collect();
            f.delete_nodes(0, &ids).await.unwrap();
            settle().await;
        }
        d.answer_deletes();
        settle().await;
    }
}

async fn create_case(end: CreateEnd, ca_deletes: bool, list_start: usize, list_apply: usize) {
    let case = format!("{end:?}, CA deletes midway: {ca_deletes}, listing {list_start}..{list_apply}");
    let steps: Vec<CreateStep> =
        [CreateStep::Increase, CreateStep::CloudMakesIt, CreateStep::CaDeletesIt, CreateStep::Returns]
            .into_iter()
            .filter(|s| ca_deletes || *s != CreateStep::CaDeletesIt)
            .collect();
    let (f, d) = scripted(0);
    list_now(&f, &d);
    let mut listing = None;
    let mut create = None;
    let mut name = String::new();
    let mut deleted = false;
    let mut returned = false;
    for slot in 0..=steps.len() {
        if slot == list_start {
            listing = Some((d.listing(), Instant::now()));
        }
        if slot == list_apply {
            let (machines, started) = listing.take().expect("started before applied");
            f.reconcile_cloud(0, machines, started);
            settle().await;
        }
        if let Some(&s) = steps.get(slot) {
            match s {
                CreateStep::Increase => {
                    f.increase(0, 1).unwrap();
                    let (n, reply) = d.next_create().await;
                    name = n;
                    create = Some(reply);
                }
                CreateStep::CloudMakesIt if end != CreateEnd::Refused => d.put(&name, MachineState::Creating),
                CreateStep::CloudMakesIt => {}
                CreateStep::CaDeletesIt => {
                    let id = instances(&f)[0].0.clone();
                    f.delete_nodes(0, &[&id]).await.unwrap_or_else(|e| panic!("{case}: {e}"));
                    deleted = true;
                }
                CreateStep::Returns => {
                    let reply = create.take().unwrap();
                    let answer = match end {
                        CreateEnd::Ok => {
                            d.put(&name, MachineState::Running);
                            Ok(Machine {
                                group: "g".into(),
                                name: name.clone(),
                                id: cloud_id(&name),
                                state: MachineState::Running,
                            })
                        }
                        CreateEnd::FailsCleaned => {
                            d.remove(&name);
                            Err(driver::Error::Other("start task failed".into()))
                        }
                        CreateEnd::FailsLeft => Err(driver::Error::Timeout("create did not finish".into())),
                        CreateEnd::Refused => Err(driver::Error::OutOfResources("quota".into())),
                    };
                    reply.send(answer).unwrap();
                    settle().await;
                    returned = true;
                }
            }
        }
        step().await;
        if slot == 0 && list_start == 0 && list_apply == 0 {
            continue;
        }
        if deleted {
            assert_eq!(f.target_size(0), 0, "{case}: slot {slot}");
            assert!(!phases(&f).contains(&"running"), "{case}: slot {slot}: {:?}", instances(&f));
        } else if !name.is_empty() {
            assert_eq!(f.target_size(0), 1, "{case}: slot {slot}: the target changed by itself");
            if returned && let Some(code) = end.code() {
                let got = instances(&f);
                assert_eq!(got.len(), 1, "{case}: slot {slot}: {got:?}");
                assert_eq!((got[0].1, got[0].2.as_deref()), ("failed", Some(code)), "{case}: slot {slot}");
            }
        }
    }
    if !deleted && let Some(code) = end.code() {
        step().await;
        list_now(&f, &d);
        assert_eq!(
            instances(&f).into_iter().map(|(_, p, c)| (p, c)).collect::<Vec<_>>(),
            [("failed", Some(code.to_owned()))],
            "{case}"
        );
    }
    ca_rounds(&f, &d).await;
    if end == CreateEnd::Ok && !deleted {
        assert_eq!(phases(&f), ["running"], "{case}");
        assert_eq!(d.names(), [name.clone()], "{case}");
        assert_eq!(f.target_size(0), 1, "{case}");
    } else {
        assert!(instances(&f).is_empty(), "{case}: {:?}", instances(&f));
        assert!(d.names().is_empty(), "{case}: leaked {:?}", d.names());
        assert_eq!(f.target_size(0), 0, "{case}");
    }
    assert!(d.try_next().is_none(), "{case}: a cloud call nobody answered");
}

#[tokio::test(start_paused = true)]
async fn every_listing_interleaving_with_a_create_keeps_it_reported_and_leaks_nothing() {
    for end in [CreateEnd::Ok, CreateEnd::FailsCleaned, CreateEnd::FailsLeft, CreateEnd::Refused] {
        for ca_deletes in [false, true] {
            let slots = if ca_deletes { 4 } else { 3 };
            for list_start in 0..=slots {
                for list_apply in list_start..=slots {
                    create_case(end, ca_deletes, list_start, list_apply).await;
                }
            }
        }
    }
}

// === every interleaving of a listing with a delete ===

#[derive(Clone, Copy, Debug, PartialEq)]
enum DeleteEnd {
    Ok,
    /// The cloud deleted it; the answer was lost.
    Lost,
    /// The cloud failed before deleting anything.
    Refused,
}

async fn delete_case(end: DeleteEnd, list_start: usize, list_apply: usize) {
    let case = format!("{end:?}, listing {list_start}..{list_apply}");
    let (f, d) = scripted(0);
    d.put("m", MachineState::Running);
    list_now(&f, &d);
    let victim = pid("m");
    let mut listing = None;
    let mut accepted = false;
    for slot in 0..=3 {
        if slot == list_start {
            listing = Some((d.listing(), Instant::now()));
        }
        if slot == list_apply {
            let (machines, started) = listing.take().expect("started before applied");
            f.reconcile_cloud(0, machines, started);
            settle().await;
        }
        match slot {
            0 => {
                f.delete_nodes(0, &[&victim]).await.unwrap();
                settle().await;
                accepted = true;
            }
            1 if end != DeleteEnd::Refused => d.remove("m"),
            2 => {
                let (_, reply) = d.next_delete().await;
                reply
                    .send(match end {
                        DeleteEnd::Ok => Ok(()),
                        DeleteEnd::Lost | DeleteEnd::Refused => Err(driver::Error::Unavailable("502".into())),
                    })
                    .unwrap();
                settle().await;
            }
            _ => {}
        }
        step().await;
        if accepted {
            assert_eq!(f.target_size(0), 0, "{case}: slot {slot}");
            assert!(!phases(&f).contains(&"running"), "{case}: slot {slot}: {:?}", instances(&f));
            f.delete_nodes(0, &[&victim]).await.unwrap_or_else(|e| panic!("{case}: slot {slot}: repeated delete: {e}"));
        }
    }
    for _ in 0..3 {
        step().await;
        list_now(&f, &d);
        settle().await;
        d.answer_deletes();
        settle().await;
    }
    assert!(instances(&f).is_empty(), "{case}: {:?}", instances(&f));
    assert!(d.names().is_empty(), "{case}");
    f.delete_nodes(0, &[&victim]).await.unwrap_or_else(|e| panic!("{case}: delete after the end: {e}"));
    assert!(d.try_next().is_none(), "{case}: a cloud call nobody answered");
}

#[tokio::test(start_paused = true)]
async fn every_listing_interleaving_with_a_delete_keeps_it_deleted() {
    for end in [DeleteEnd::Ok, DeleteEnd::Lost, DeleteEnd::Refused] {
        for list_start in 0..=3 {
            for list_apply in list_start..=3 {
                delete_case(end, list_start, list_apply).await;
            }
        }
    }
}

// === restarts ===

#[tokio::test(start_paused = true)]
async fn an_accepted_delete_survives_a_restart() {
    let (f, d) = scripted(0);
    d.put("m", MachineState::Running);
    list_now(&f, &d);
    f.delete_nodes(0, &[&pid("m")]).await.unwrap();
    assert_eq!(d.state_of("m"), Some(MachineState::Deleting), "marked before DeleteNodes answered");
    settle().await;
    // The process dies before the cloud deleted anything.
    drop(d.try_next());
    f.tasks().close();
    let g = restart(&d, 0);
    list_now(&g, &d);
    assert_eq!(phases(&g), ["deleting"]);
    assert_eq!(g.target_size(0), 0);
    settle().await;
    assert_eq!(d.answer_deletes(), 1, "the new process deletes it again");
    settle().await;
    step().await;
    list_now(&g, &d);
    assert!(instances(&g).is_empty());
    assert!(d.names().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_first_sizing_call_after_a_start_waits_for_a_listing_and_gives_up_after_refresh_timeout() {
    let (f, d) = scripted(0);
    d.put("m", MachineState::Running);
    d.down.store(true, Ordering::SeqCst);
    let started = Instant::now();
    assert!(matches!(f.wait_listed(0).await, Err(Error::NotListed { .. })));
    assert_eq!(started.elapsed(), f.state_config.refresh_timeout);
    d.down.store(false, Ordering::SeqCst);
    f.wait_listed(0).await.unwrap();
    assert!(f.is_listed(0));
    assert_eq!(f.target_size(0), 1, "sized from the listing");
}

#[tokio::test(start_paused = true)]
async fn a_cloud_finishing_a_delete_that_returned_is_neither_shown_nor_asked_again() {
    let (f, d) = scripted(0);
    d.put("m", MachineState::Running);
    list_now(&f, &d);
    f.delete_nodes(0, &[&pid("m")]).await.unwrap();
    settle().await;
    // The cloud accepted the delete and takes its time (Nova's task_state deleting).
    let (_, reply) = d.next_delete().await;
    reply.send(Ok(())).unwrap();
    settle().await;
    for _ in 0..3 {
        step().await;
        list_now(&f, &d);
        settle().await;
        assert!(instances(&f).is_empty(), "{:?}", instances(&f));
        assert!(d.try_next().is_none(), "no second delete while the cloud finishes the first");
    }
    // Were it to come back to life, it is deleted again.
    d.put("m", MachineState::Running);
    step().await;
    list_now(&f, &d);
    settle().await;
    assert_eq!(phases(&f), ["deleting"]);
    assert_eq!(d.answer_deletes(), 1);
}

// === the caller's deadline ===

#[tokio::test(start_paused = true)]
async fn an_rpc_waits_at_most_refresh_timeout_and_never_past_the_callers_deadline() {
    let (f, _) = scripted(0);
    assert_eq!(f.state_config.refresh_timeout, Duration::from_secs(3));
    let wait = |t: Option<Duration>| f.wait_until(t) - Instant::now();
    assert_eq!(wait(None), Duration::from_secs(3));
    assert_eq!(wait(Some(Duration::from_secs(30))), Duration::from_secs(3));
    // cluster-autoscaler's default 5 s leaves refresh_timeout as it is; shorter deadlines keep
    // a tenth of themselves (at most a second) to answer in.
    assert_eq!(wait(Some(Duration::from_secs(5))), Duration::from_secs(3));
    assert_eq!(wait(Some(Duration::from_millis(3200))), Duration::from_millis(2880));
    assert_eq!(wait(Some(Duration::from_millis(100))), Duration::from_millis(90));
    assert_eq!(wait(Some(Duration::ZERO)), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn the_wait_for_the_first_listing_ends_at_the_callers_deadline() {
    let (f, d) = scripted(0);
    d.put("m", MachineState::Running);
    d.down.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let until = f.wait_until(Some(Duration::from_secs(2)));
    assert!(matches!(f.wait_listed_until(0, until).await, Err(Error::NotListed { .. })));
    assert_eq!(started.elapsed(), Duration::from_millis(1800));
    assert!(matches!(f.wait_all_listed_until(until).await, Err(Error::NotListed { .. })), "the deadline has passed");
    assert_eq!(started.elapsed(), Duration::from_millis(1800), "no second wait");
}

#[tokio::test(start_paused = true)]
async fn delete_nodes_answers_by_the_callers_deadline_while_marks_hang_and_the_deletes_go_on() {
    let (f, sim) = simulated();
    f.reconcile_cloud(0, Vec::new(), Instant::now());
    f.increase(0, 1).unwrap();
    f.tasks().close();
    f.tasks().wait().await;
    f.reconcile_cloud(0, sim.list().await.unwrap(), Instant::now());
    let victim = instances(&f)[0].0.clone();
    sim.faults().push(Op::Mark, Fault::Hang);
    let started = Instant::now();
    let until = f.wait_until(Some(Duration::from_secs(1)));
    f.delete_nodes_until(0, &[&victim], until).await.expect("accepted, though not yet recorded in the cloud");
    assert_eq!(started.elapsed(), Duration::from_millis(900));
    assert_eq!(phases(&f), ["deleting"]);
    assert_eq!(f.target_size(0), 0);
    // The mark times out (delete_timeout) and the delete goes ahead.
    f.tasks().wait().await;
    assert!(sim.machines().is_empty(), "{:?}", sim.machines());
    assert!(instances(&f).is_empty());
}

/// A cloud that describes its machines only when the test says so.
#[derive(Debug, Default)]
struct SlowShape {
    described: tokio::sync::Notify,
    asked: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Driver for SlowShape {
    fn kind(&self) -> &'static str {
        "slow-shape"
    }

    async fn list(&self) -> driver::Result<Vec<Machine>> {
        Ok(Vec::new())
    }

    async fn create(&self, _group: &str, _name: &str) -> driver::Result<Machine> {
        Err(driver::Error::Other("not in this test".into()))
    }

    async fn delete(&self, machine: &MachineRef) -> driver::Result<()> {
        Err(driver::Error::NotFound(machine.id.clone()))
    }

    async fn shape(&self, _group: &str) -> driver::Result<Option<driver::Shape>> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.described.notified().await;
        Ok(Some(driver::Shape { cpu_millis: Some(2000), ..Default::default() }))
    }

    async fn check(&self) -> driver::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_template_the_cloud_is_slow_to_describe_answers_by_the_deadline_and_is_built_on_for_the_next_call() {
    let d = Arc::new(SlowShape::default());
    let f = Fleet::new(&config(0), vec![Arc::clone(&d) as SharedDriver]);
    let started = Instant::now();
    let until = f.wait_until(Some(Duration::from_secs(1)));
    let e = f.template_until(0, until).await.expect_err("the cloud has not answered");
    assert_eq!(started.elapsed(), Duration::from_millis(900));
    assert!(matches!(&e, Error::Driver { source: driver::Error::Timeout(_), .. }), "{e:?}");
    assert!(e.to_string().contains("try again"), "{e}");
    // The cloud answers after the caller gave up: the next call finds the template built,
    // without asking the cloud again.
    d.described.notify_one();
    settle().await;
    let t = f.template_until(0, f.wait_until(Some(Duration::from_secs(1)))).await.unwrap();
    assert_eq!(t.capacity("cpu"), Some("2"));
    assert_eq!(d.asked.load(Ordering::SeqCst), 1);
}
