//! Network plumbing shared by sources, sinks and the API: TLS material, reconnect
//! backoff, and the limits that protect the process (file descriptors, partial frames).

pub mod backoff;
pub mod limits;
pub mod tls;
