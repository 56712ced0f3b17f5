//! User data rendered per machine from a minijinja template, optionally turned from Butane into
//! Ignition by an external `butane` binary (for Fedora CoreOS), as the K3s-on-OpenStack
//! autoscaler does. Without Butane the rendered text (cloud-init, Ignition JSON, a script) is
//! passed to Nova as is.
//!
//! The template sees `join_url`, `join_token`, and what every boot-script template sees
//! ([`script`]: `name`, `group`, `cluster`, every key of the group's `template_data` table, both
//! at the top level, as the autoscaler's `butaneConfigData` was, and under `data`; the filter
//! `shell_quote`). Reading, checking and rendering the template is [`script`]'s; Butane and
//! Nova's size limit are this module's.

use std::{path::PathBuf, process::Stdio, time::Duration};

use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

pub use crate::driver::script::Target;
use crate::{
    config::{Problems, Secret},
    driver::script::{self, Context, Keys, Template},
};

/// Nova's limit on `user_data`, counted after base64 encoding.
pub const NOVA_USER_DATA_LIMIT: usize = 65_535;

/// How long `butane` may take for one machine.
const BUTANE_TIMEOUT: Duration = Duration::from_secs(30);

/// Variables this driver adds to [`script::COMMON`]; `template_data` may not redefine them.
pub const RESERVED: &[&str] = &["join_url", "join_token"];

/// Where a group's template is configured.
pub const KEYS: Keys = Keys { what: "user data", inline: "user_data", file: Some("user_data_template") };

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Render(#[from] script::Error),
    #[error("cannot run butane binary {binary}: {source}")]
    ButaneSpawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("butane failed ({status}): {stderr}")]
    ButaneFailed { status: String, stderr: String },
    #[error("butane did not finish within {0:?}")]
    ButaneTimeout(Duration),
    #[error("user data is {0} bytes once base64-encoded; Nova accepts at most {NOVA_USER_DATA_LIMIT}")]
    TooLarge(usize),
}

/// One group's user-data recipe.
#[derive(Clone, Debug)]
pub struct UserData {
    pub template: Template,
    /// `template_data`, as JSON.
    pub data: Map<String, Value>,
    pub join_url: Option<String>,
    pub join_token: Option<Secret>,
    /// The `butane` binary to pipe the rendered text through, if any.
    pub butane: Option<PathBuf>,
}

impl UserData {
    fn context(&self, target: Target<'_>) -> Context {
        Context::new(target, &self.data)
            .with("join_url", self.join_url.clone())
            .with("join_token", self.join_token.as_ref().map(Secret::expose))
    }

    /// The configuration check: one trial render of the template (no Butane) for `target`, a
    /// problem at the template's key if it fails.
    pub fn check(&self, target: Target<'_>, p: &mut Problems) {
        self.template.check(&self.context(target), p);
    }

    /// The user data of one machine, ready for Nova (not yet base64-encoded).
    pub async fn render(&self, target: Target<'_>) -> Result<String, Error> {
        let text = self.template.render(&self.context(target))?;
        let text = match &self.butane {
            Some(binary) => butane(binary, &text).await?,
            None => text,
        };
        let encoded = text.len().div_ceil(3) * 4;
        if encoded > NOVA_USER_DATA_LIMIT {
            return Err(Error::TooLarge(encoded));
        }
        Ok(text)
    }
}

/// Runs `butane --strict`, Butane YAML in, Ignition JSON out.
async fn butane(binary: &PathBuf, input: &str) -> Result<String, Error> {
    let spawn_err = |source| Error::ButaneSpawn { binary: binary.display().to_string(), source };
    let mut child = tokio::process::Command::new(binary)
        .arg("--strict")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.to_owned();
    // Written from its own task so a butane that answers before reading all of it cannot
    // deadlock against us.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(input.as_bytes()).await;
    });
    let output = match tokio::time::timeout(BUTANE_TIMEOUT, child.wait_with_output()).await {
        Ok(r) => r.map_err(spawn_err)?,
        Err(_) => return Err(Error::ButaneTimeout(BUTANE_TIMEOUT)),
    };
    let _ = writer.await;
    if !output.status.success() {
        return Err(Error::ButaneFailed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().chars().take(500).collect(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
