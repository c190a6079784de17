//! Listen addresses claimed by the API and the sources: two listeners cannot share a port.

use std::net::SocketAddr;

use toml::Spanned;

use super::{ConfigError, Context};

/// The addresses claimed so far, with the key that claimed each.
pub struct ListenerClaims<'a> {
    context: &'a Context<'a>,
    claimed: Vec<(SocketAddr, String)>,
}

impl<'a> ListenerClaims<'a> {
    /// No address claimed yet.
    pub fn new(context: &'a Context<'a>) -> Self {
        Self {
            context,
            claimed: Vec::new(),
        }
    }

    /// Claims `address` for `key`; an error if a claimed listener overlaps it.
    pub fn claim(&mut self, address: &Spanned<SocketAddr>, key: String) -> Result<(), ConfigError> {
        let addr = *address.get_ref();
        for (other, other_key) in &self.claimed {
            let overlaps = other.ip() == addr.ip()
                || other.ip().is_unspecified()
                || addr.ip().is_unspecified();
            if other.port() == addr.port() && overlaps {
                return Err(self.context.error_at(
                    address.span(),
                    &key,
                    format!(
                        "{addr} is already used by `{other_key}`; two listeners cannot share a port"
                    ),
                ));
            }
        }
        self.claimed.push((addr, key));
        Ok(())
    }
}
