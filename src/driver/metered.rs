//! A decorator that times every driver call and counts its errors by kind, so drivers
//! themselves contain no metrics code.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;

use super::{Driver, Machine, MachineRef, Result, Shape, SharedDriver};
use crate::telemetry::metrics::{DriverLabels, Metrics};

#[derive(Debug)]
pub struct Metered {
    inner: SharedDriver,
    cloud: String,
    metrics: Arc<Metrics>,
}

impl Metered {
    /// Wraps `inner`, labelling its metrics with `cloud`.
    pub fn wrap(inner: SharedDriver, cloud: &str, metrics: Arc<Metrics>) -> SharedDriver {
        Arc::new(Metered { inner, cloud: cloud.to_owned(), metrics })
    }

    fn observe<T>(&self, operation: &'static str, started: Instant, result: &Result<T>) {
        let labels = DriverLabels { cloud: self.cloud.clone(), driver: self.inner.kind(), operation };
        // A delete of something already gone is success, not an error worth alerting on.
        let error = match result {
            Err(super::Error::NotFound(_)) if operation == "delete" || operation == "mark_deleting" => None,
            Err(e) => Some(e.kind()),
            Ok(_) => None,
        };
        self.metrics.observe_driver(&labels, started.elapsed().as_secs_f64(), error);
    }
}

#[async_trait]
impl Driver for Metered {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn list(&self) -> Result<Vec<Machine>> {
        let started = Instant::now();
        let r = self.inner.list().await;
        self.observe("list", started, &r);
        r
    }

    async fn create(&self, group: &str, name: &str) -> Result<Machine> {
        let started = Instant::now();
        let r = self.inner.create(group, name).await;
        self.observe("create", started, &r);
        r
    }

    async fn delete(&self, machine: &MachineRef) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.delete(machine).await;
        self.observe("delete", started, &r);
        r
    }

    async fn mark_deleting(&self, machine: &MachineRef) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.mark_deleting(machine).await;
        self.observe("mark_deleting", started, &r);
        r
    }

    fn can_stop(&self) -> bool {
        self.inner.can_stop()
    }

    async fn stop(&self, machine: &MachineRef) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.stop(machine).await;
        self.observe("stop", started, &r);
        r
    }

    async fn start(&self, machine: &MachineRef) -> Result<Machine> {
        let started = Instant::now();
        let r = self.inner.start(machine).await;
        self.observe("start", started, &r);
        r
    }

    async fn shape(&self, group: &str) -> Result<Option<Shape>> {
        let started = Instant::now();
        let r = self.inner.shape(group).await;
        self.observe("shape", started, &r);
        r
    }

    async fn check(&self) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.check().await;
        self.observe("check", started, &r);
        r
    }
}
