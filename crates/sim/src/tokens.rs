//! Hello tokens: one shared `--token`, or `--tokens FILE`, a JSON object mapping
//! device id -> token (e.g. secrets or JWTs collected from the registry API), so each
//! device's hello carries its own credential.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::cli::TargetArgs;

/// The token each device puts in its hello.
#[derive(Debug, Clone, Default)]
pub struct HelloTokens {
    /// `--token`: the same for every device.
    shared: Option<String>,
    /// `--tokens FILE`: per device; a device missing from it sends no token.
    per_device: BTreeMap<String, String>,
}

impl HelloTokens {
    /// From --token / --tokens (clap makes them exclusive).
    pub fn load(target: &TargetArgs) -> anyhow::Result<Self> {
        let per_device = match &target.tokens {
            Some(path) => read_file(path)?,
            None => BTreeMap::new(),
        };
        Ok(Self {
            shared: target.token.clone(),
            per_device,
        })
    }

    /// The token for `device`'s hello.
    pub fn get(&self, device: &str) -> Option<&str> {
        self.per_device
            .get(device)
            .or(self.shared.as_ref())
            .map(String::as_str)
    }

    /// The devices of a --tokens file, in id order (empty without one).
    pub fn devices(&self) -> Vec<String> {
        self.per_device.keys().cloned().collect()
    }

    /// With a --tokens file, fails naming the first of `ids` that has no token in it.
    pub fn check_covers(&self, mut ids: impl Iterator<Item = String>) -> anyhow::Result<()> {
        if self.per_device.is_empty() {
            return Ok(());
        }
        match ids.find(|id| !self.per_device.contains_key(id)) {
            Some(id) => bail!(
                "--tokens has no token for device {id:?} (it has {} devices; check --prefix and --devices)",
                self.per_device.len()
            ),
            None => Ok(()),
        }
    }
}

/// Reads a `{"device id": "token", ...}` file.
fn read_file(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --tokens {}", path.display()))?;
    parse(&text).with_context(|| format!("--tokens {}", path.display()))
}

/// Parses a JSON object of device id -> token (string values, at least one entry).
fn parse(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let tokens: BTreeMap<String, String> = serde_json::from_str(text)
        .context("expected a JSON object mapping device id to token string")?;
    if tokens.is_empty() {
        bail!("no devices in the file");
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn tokens_file_gives_each_device_its_own_hello_token() {
        let path = std::env::temp_dir().join(format!("sim-tokens-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"dev-1": "s1", "dev-2": "a.b.c"}"#).unwrap();
        let cli =
            Cli::try_parse_from(["fieldgate-sim", "storm", "--tokens", path.to_str().unwrap()])
                .unwrap();
        let Command::Storm(args) = cli.command else {
            panic!("not storm")
        };
        assert!(args.target.sends_hello(), "--tokens implies --hello");
        let tokens = HelloTokens::load(&args.target).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(tokens.get("dev-1"), Some("s1"));
        assert_eq!(tokens.get("dev-2"), Some("a.b.c"));
        assert_eq!(tokens.get("dev-3"), None);
        assert_eq!(tokens.devices(), vec!["dev-1", "dev-2"]);
        assert!(
            tokens
                .check_covers(["dev-1".into(), "dev-2".into()].into_iter())
                .is_ok()
        );
        let missing = tokens
            .check_covers((1..=3).map(|n| format!("dev-{n}")))
            .unwrap_err();
        assert!(missing.to_string().contains("\"dev-3\""), "{missing}");

        assert!(parse("{}").is_err());
        assert!(parse(r#"{"dev-1": 5}"#).is_err());
        assert!(parse("[]").is_err());
        assert!(
            HelloTokens::default()
                .check_covers(std::iter::once("x".into()))
                .is_ok()
        );
        assert!(
            Cli::try_parse_from(["fieldgate-sim", "tcp", "--token", "t", "--tokens", "f"]).is_err(),
            "--token and --tokens exclude each other"
        );
    }
}
