//! Waits on the GPU with a deadline. cwm never calls `cuStreamSynchronize` or
//! `cuEventSynchronize`: an engine that dies or stalls after sending its event would block the
//! copy thread forever, holding the instance's stream, so the reaper could never unmap the dead
//! engine's memory. Instead the stream or event is polled (`cuStreamQuery` / `cuEventQuery`)
//! with a growing sleep until it completes or the deadline (`CWM_CUDA_WAIT_SECS`, default 30 s)
//! passes.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUresult;

use super::driver::check;
use super::error::CudaError;

/// Seconds a transfer may wait for the engine's event, and then for its own copies.
pub const WAIT_ENV: &str = "CWM_CUDA_WAIT_SECS";
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Longest sleep between two polls: bounds the latency a poll adds to a transfer.
const MAX_NAP: Duration = Duration::from_micros(500);

/// The wait budget (`CWM_CUDA_WAIT_SECS`, a positive number; a bad value is logged and the
/// default used).
pub fn budget() -> Duration {
    static B: OnceLock<Duration> = OnceLock::new();
    *B.get_or_init(|| match std::env::var(WAIT_ENV) {
        Err(_) => DEFAULT_WAIT,
        Ok(v) => match v.parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Duration::from_secs_f64(s),
            _ => {
                tracing::error!(
                    "{WAIT_ENV}={v:?} is not a positive number of seconds: using {}",
                    DEFAULT_WAIT.as_secs()
                );
                DEFAULT_WAIT
            }
        },
    })
}

/// Why a wait ended without completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    /// Still not complete at the deadline (`CudaError::Timeout`).
    Expired(CudaError),
    /// The driver reported an error.
    Failed(CudaError),
}

impl WaitError {
    pub fn error(self) -> CudaError {
        match self {
            WaitError::Expired(e) | WaitError::Failed(e) => e,
        }
    }
}

/// Poll `query` until it stops answering `CUDA_ERROR_NOT_READY`, for at most `budget`.
pub fn poll(
    what: &'static str,
    budget: Duration,
    mut query: impl FnMut() -> CUresult,
) -> Result<(), WaitError> {
    let deadline = Instant::now() + budget;
    let mut nap = Duration::from_micros(10);
    loop {
        match query() {
            CUresult::CUDA_ERROR_NOT_READY => {}
            r => return check(r, what).map_err(WaitError::Failed),
        }
        if Instant::now() >= deadline {
            return Err(WaitError::Expired(CudaError::Timeout {
                what,
                budget_ms: budget.as_millis() as u64,
            }));
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(MAX_NAP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_until_complete_and_expires_at_the_deadline() {
        let mut n = 0;
        let r = poll("q", Duration::from_secs(5), || {
            n += 1;
            if n < 4 {
                CUresult::CUDA_ERROR_NOT_READY
            } else {
                CUresult::CUDA_SUCCESS
            }
        });
        assert_eq!(r, Ok(()));
        assert_eq!(n, 4);
        let r = poll("q", Duration::from_millis(20), || {
            CUresult::CUDA_ERROR_NOT_READY
        });
        let Err(WaitError::Expired(e)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            e,
            CudaError::Timeout {
                what: "q",
                budget_ms: 20
            }
        );
        assert_eq!(
            e.to_string(),
            format!("q: not complete after 0.0 s ({WAIT_ENV})")
        );
        // (A driver error is described by the driver itself: cuda_sim covers that path.)
    }
}
