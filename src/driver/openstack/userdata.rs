//! User data rendered per machine from a minijinja template, optionally turned from Butane into
//! Ignition by an external `butane` binary (for Fedora CoreOS), as the K3s-on-OpenStack
//! autoscaler does. Without Butane the rendered text (cloud-init, Ignition JSON, a script) is
//! passed to Nova as is.
//!
//! The template sees `name`, `group`, `cluster`, `join_url`, `join_token`, and every key of
//! the group's `template_data` table, both at the top level (as the autoscaler's
//! `butaneConfigData` was) and under `data`.

use std::{path::PathBuf, process::Stdio, time::Duration};

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use crate::config::Secret;

/// Nova's limit on `user_data`, counted after base64 encoding.
pub const NOVA_USER_DATA_LIMIT: usize = 65_535;

/// How long `butane` may take for one machine.
const BUTANE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keys the template context fills itself; `template_data` may not redefine them.
pub const RESERVED: &[&str] = &["name", "group", "cluster", "join_url", "join_token", "data"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot render the user data template: {source}{}",
        if unknown.is_empty() { String::new() } else { format!("; unknown variables: {}", unknown.join(", ")) }
    )]
    Render {
        /// Variables the template uses that its context does not have.
        unknown: Vec<String>,
        #[source]
        source: minijinja::Error,
    },
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
    /// The template text.
    pub template: String,
    /// Where the template came from, for messages.
    pub origin: String,
    /// `template_data`, as JSON.
    pub data: Map<String, Value>,
    pub join_url: Option<String>,
    pub join_token: Option<Secret>,
    /// The `butane` binary to pipe the rendered text through, if any.
    pub butane: Option<PathBuf>,
}

/// Which machine the user data is for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub cluster: &'a str,
    pub group: &'a str,
    pub name: &'a str,
}

impl UserData {
    /// Renders the template only (no Butane): also how configuration checks it.
    pub fn render_template(&self, target: Target<'_>) -> Result<String, Error> {
        let mut env = Environment::new();
        // A misspelt variable is an error, not an empty string in a node's config.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        let mut ctx = self.data.clone();
        ctx.insert("data".into(), Value::Object(self.data.clone()));
        ctx.insert("name".into(), target.name.into());
        ctx.insert("group".into(), target.group.into());
        ctx.insert("cluster".into(), target.cluster.into());
        ctx.insert("join_url".into(), self.join_url.clone().map(Value::from).unwrap_or(Value::Null));
        ctx.insert(
            "join_token".into(),
            self.join_token.as_ref().map(|s| Value::from(s.expose())).unwrap_or(Value::Null),
        );
        let template = env
            .template_from_named_str(&self.origin, &self.template)
            .map_err(|source| Error::Render { unknown: Vec::new(), source })?;
        template.render(Value::Object(ctx.clone())).map_err(|source| {
            let mut unknown: Vec<String> =
                template.undeclared_variables(false).into_iter().filter(|v| !ctx.contains_key(v)).collect();
            unknown.sort();
            Error::Render { unknown, source }
        })
    }

    /// The user data of one machine, ready for Nova (not yet base64-encoded).
    pub async fn render(&self, target: Target<'_>) -> Result<String, Error> {
        let text = self.render_template(target)?;
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
