//! The CPU sampler of a build without the `profiling` feature: there is none.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ProfileError, ProfileFormat};

/// Always [`ProfileError::NotBuilt`].
pub(super) async fn capture(
    _duration: Duration,
    _format: ProfileFormat,
    _shutdown: &CancellationToken,
) -> Result<Vec<u8>, ProfileError> {
    Err(ProfileError::NotBuilt)
}
