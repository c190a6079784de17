//! `type = "http"`: HTTP ingestion (`POST /api/v1/devices/{id}/telemetry`) as a source.
//! It is there, named `http`, whenever `[registry]` is configured; sinks and transforms
//! list `"http"` in `inputs` to receive its events.

use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::{RunningSource, SourceContext, SourceSpec};
use crate::api::ingest::{HTTP_SOURCE, MAX_BODY};
use crate::config::{ConfigError, Context, ListenerClaims, Settings};

/// `[sources.http]` with `type = "http"`; no options yet.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {}

impl SourceSpec for HttpSourceConfig {
    fn check(
        &self,
        name: &str,
        settings: &Settings,
        _listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        if name != HTTP_SOURCE {
            return Err(context.key_error(
                &format!("sources.{name}.type"),
                format!("the HTTP ingestion source must be named {HTTP_SOURCE:?}"),
            ));
        }
        if settings.registry.is_none() || settings.api.is_none() {
            return Err(context.key_error(
                &format!("sources.{name}"),
                "HTTP ingestion needs a [registry] and an [api] section",
            ));
        }
        Ok(())
    }

    fn largest_event(&self) -> u64 {
        MAX_BODY as u64
    }

    fn build<'a>(
        &'a self,
        _name: &'a str,
        context: SourceContext,
    ) -> BoxFuture<'a, anyhow::Result<RunningSource>> {
        Box::pin(async move {
            let ingest = context
                .ingest
                .ok_or_else(|| anyhow::anyhow!("HTTP ingestion needs the API"))?;
            let (output, stop) = (context.output, context.stop);
            Ok(RunningSource {
                task: Box::pin(async move {
                    ingest.open(output);
                    stop.cancelled().await;
                    ingest.close();
                }),
                tls: None,
            })
        })
    }
}
