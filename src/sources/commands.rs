//! `type = "commands"`: the command results the gateway itself produces (a command that
//! expired before its device answered), as a source named `commands`. It is there
//! whenever `[registry]` is configured. Results the devices send travel with the rest
//! of their device's events.
//!
//! Unless a sink or transform lists `"commands"` in `inputs`, it feeds every sink, as
//! earlier versions did.

use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::{RunningSource, SourceContext, SourceSpec};
use crate::config::{ConfigError, Context, ListenerClaims, Settings};

/// The name the command-result source has.
pub const COMMANDS_SOURCE: &str = "commands";

/// Generous bound on a gateway-made command result.
const LARGEST_RESULT: u64 = 4096;

/// `[sources.commands]` with `type = "commands"`; no options yet.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsSourceConfig {}

impl SourceSpec for CommandsSourceConfig {
    fn check(
        &self,
        name: &str,
        settings: &Settings,
        _listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        if name != COMMANDS_SOURCE {
            return Err(context.key_error(
                &format!("sources.{name}.type"),
                format!("the command-result source must be named {COMMANDS_SOURCE:?}"),
            ));
        }
        if settings.registry.is_none() {
            return Err(context.key_error(
                &format!("sources.{name}"),
                "command results need a [registry] section",
            ));
        }
        Ok(())
    }

    fn largest_event(&self) -> u64 {
        LARGEST_RESULT
    }

    fn build<'a>(
        &'a self,
        _name: &'a str,
        context: SourceContext,
    ) -> BoxFuture<'a, anyhow::Result<RunningSource>> {
        Box::pin(async move {
            let commands = context
                .services
                .commands
                .clone()
                .ok_or_else(|| anyhow::anyhow!("command results need the registry"))?;
            let (output, stop) = (context.output, context.stop);
            Ok(RunningSource {
                task: Box::pin(async move {
                    commands.open_results(output);
                    std::sync::Arc::clone(&commands).run_expiry(stop).await;
                    commands.close_results();
                }),
                tls: None,
            })
        })
    }
}
