//! A second stream per GPU for work that can overlap the main (candle's) stream: the LoRA shrink
//! of a module reads only the module's input, so it runs beside the base matmul instead of after
//! it (`sgmv::shrink`). [`Fork::new`] makes the side stream wait for everything queued on the
//! main stream so far; [`Fork::join`] (or dropping the fork) makes the main stream wait for the
//! side stream's work. Inside a CUDA graph capture the two become a fork and a join of the graph.
//!
//! Every buffer lives on the main stream (allocations and frees are ordered there, event
//! tracking is off): work on the side stream may only use buffers allocated before the fork and
//! kept alive until the join, which the fork's owner guarantees.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::{CudaDevice, WrapErr};

use crate::QuantError;

thread_local! {
    /// This thread's side stream per GPU ordinal (a step runs on one thread; streams are cheap).
    static SIDE: RefCell<HashMap<usize, Arc<CudaStream>>> = RefCell::new(HashMap::new());
}

static ENABLED: AtomicBool = AtomicBool::new(true);
static FORKS: AtomicU64 = AtomicU64::new(0);

/// Forks made so far in this process (tests check that captured steps overlap).
pub fn forks_made() -> u64 {
    FORKS.load(Ordering::Relaxed)
}

/// Turns the side stream on or off for the whole process (on by default), e.g. to measure what
/// the overlap brings; off, callers queue everything on the main stream.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether work should be forked onto a side stream of `dev`: inside a CUDA graph capture (where
/// a fork costs nothing at replay; eagerly its events cost host time per call) unless turned off,
/// and with cudarc's per-buffer event tracking off (as lorq runs: with it on, a buffer used on
/// the side stream would make it wait on an event recorded outside the capture, which the
/// capture refuses).
pub fn wanted(dev: &CudaDevice) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && super::graph::capturing()
        && !dev.cuda_stream().context().is_event_tracking()
}

/// The side stream of `dev` on this thread, created on first use.
fn side_stream(dev: &CudaDevice) -> Result<Arc<CudaStream>, QuantError> {
    let main = dev.cuda_stream();
    let ordinal = main.context().ordinal();
    SIDE.with(|s| {
        let mut s = s.borrow_mut();
        if let Some(st) = s.get(&ordinal) {
            return Ok(st.clone());
        }
        let st = main.context().new_stream().w()?;
        s.insert(ordinal, st.clone());
        Ok(st)
    })
}

/// Work queued on a side stream after everything on the main stream so far; joined back into
/// the main stream by [`Fork::join`] or on drop (a capture must never end with the side stream
/// unjoined).
pub struct Fork {
    main: Arc<CudaStream>,
    side: Arc<CudaStream>,
    joined: bool,
}

impl Fork {
    pub fn new(dev: &CudaDevice) -> Result<Self, QuantError> {
        let main = dev.cuda_stream();
        let side = side_stream(dev)?;
        side.join(&main).w()?;
        FORKS.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            main,
            side,
            joined: false,
        })
    }

    /// The stream to queue the overlapping work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.side
    }

    /// Makes the main stream wait for the side stream's work so far.
    pub fn join(mut self) -> Result<(), QuantError> {
        self.joined = true;
        self.main.join(&self.side).w()?;
        Ok(())
    }
}

impl Drop for Fork {
    fn drop(&mut self) {
        if !self.joined {
            if let Err(e) = self.main.join(&self.side) {
                tracing::error!("joining the side stream back into the main stream: {e:?}");
            }
        }
    }
}
