//! The byte budget every stream of a server shares for samples in flight and batches not yet
//! consumed.

use std::sync::Arc;

/// A byte budget shared by every stream of a server: a sample reserves its size before it is
/// assembled and the reservation travels with its batch until the batch is dropped, so memory
/// held by samples in flight and batches waiting for slow clients stays bounded no matter how
/// many clients connect.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    semaphore: Arc<tokio::sync::Semaphore>,
    /// Permits are KiB so that budgets up to terabytes fit the semaphore's counter.
    total_kib: u32,
}

impl MemoryBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let total_kib = (bytes / 1024).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        Self {
            semaphore: Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Waits until `bytes` (capped at the whole budget, so one oversized sample still runs
    /// alone) are free and reserves them.
    pub async fn reserve(&self, bytes: u64) -> tokio::sync::OwnedSemaphorePermit {
        let kib = (bytes.div_ceil(1024) as u32).clamp(1, self.total_kib);
        self.semaphore
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Reserves `bytes` (capped at the whole budget) if they are free now, without waiting.
    pub fn try_reserve(&self, bytes: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let kib = (bytes.div_ceil(1024).min(u64::from(self.total_kib)) as u32).max(1);
        self.semaphore.clone().try_acquire_many_owned(kib).ok()
    }

    /// Bytes not reserved right now.
    pub fn available_bytes(&self) -> u64 {
        self.semaphore.available_permits() as u64 * 1024
    }

    /// The whole budget in bytes.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }
}
