//! Test-only: a key provider a fixed round trip away, that counts what it is asked, so the
//! layers shared by the network backends (the unwrap batcher, the pool of new-file keys) can be
//! tested for what they send and when, without a network.

use super::pool::KeyPool;
use super::{Binding, BoxFuture, Description, KeyProvider, KeyStatus, KmsError, WrappedDek};
use crate::crypto::SecretKey;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Answers every request after `rtt`; its keys are random (nothing here checks them).
pub(in crate::kms) struct Distant {
    pub rtt: Duration,
    /// Requests for one new key (`generate`).
    pub single_generates: AtomicUsize,
    /// Batch requests for new keys (`generate_many`).
    pub batch_generates: AtomicUsize,
    /// Batch unwrap requests in flight now, and the most seen at once.
    pub unwraps_in_flight: AtomicUsize,
    pub most_unwraps_in_flight: AtomicUsize,
    /// Batch unwrap requests sent.
    pub unwrap_requests: AtomicUsize,
    /// New-file keys made ahead, as a network backend keeps them.
    pub pool: KeyPool,
}

impl Distant {
    pub fn new(rtt: Duration) -> Self {
        Distant {
            rtt,
            single_generates: AtomicUsize::new(0),
            batch_generates: AtomicUsize::new(0),
            unwraps_in_flight: AtomicUsize::new(0),
            most_unwraps_in_flight: AtomicUsize::new(0),
            unwrap_requests: AtomicUsize::new(0),
            pool: KeyPool::default(),
        }
    }

    fn wrapped() -> WrappedDek {
        WrappedDek {
            key_ref: "distant".into(),
            blob: vec![1],
        }
    }
}

impl KeyProvider for Distant {
    fn describe(&self) -> Description {
        Description {
            backend: "distant",
            key_ref: "distant".into(),
        }
    }

    fn generate<'a>(&'a self, _: &'a Binding) -> BoxFuture<'a, Result<(SecretKey, WrappedDek), KmsError>> {
        Box::pin(async move {
            self.single_generates.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.rtt).await;
            Ok((SecretKey::generate(), Self::wrapped()))
        })
    }

    fn generate_many<'a>(
        &'a self,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Vec<Result<(SecretKey, WrappedDek), KmsError>>> {
        Box::pin(async move {
            self.batch_generates.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.rtt).await;
            bindings
                .iter()
                .map(|_| Ok((SecretKey::generate(), Self::wrapped())))
                .collect()
        })
    }

    fn unwrap<'a>(&'a self, w: &'a WrappedDek, b: &'a Binding) -> BoxFuture<'a, Result<SecretKey, KmsError>> {
        Box::pin(async move { super::single(self.unwrap_many(&[(w.clone(), *b)]).await) })
    }

    fn unwrap_many<'a>(
        &'a self,
        items: &'a [(WrappedDek, Binding)],
    ) -> BoxFuture<'a, Vec<Result<SecretKey, KmsError>>> {
        Box::pin(async move {
            self.unwrap_requests.fetch_add(1, Ordering::SeqCst);
            let now = self.unwraps_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_unwraps_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.rtt).await;
            self.unwraps_in_flight.fetch_sub(1, Ordering::SeqCst);
            items.iter().map(|_| Ok(SecretKey::generate())).collect()
        })
    }

    fn rewrap<'a>(
        &'a self,
        w: &'a WrappedDek,
        _: &'a Binding,
    ) -> BoxFuture<'a, Result<WrappedDek, KmsError>> {
        Box::pin(async move { Ok(w.clone()) })
    }

    fn check_access(&self) -> BoxFuture<'_, Result<KeyStatus, KmsError>> {
        Box::pin(async move {
            Ok(KeyStatus {
                key_ref: "distant".into(),
                current_version: 1,
            })
        })
    }

    fn version_of(&self, _: &WrappedDek) -> Option<u32> {
        None
    }
}
