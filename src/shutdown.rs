//! One shutdown signal shared by every task of the daemon: created once at the top, fired once
//! (by SIGINT or SIGTERM), and passed down to the scheduler, its ticks, the notify followers,
//! the runs (which check it at batch boundaries) and the `/metrics` server. Tasks that wait
//! `select!` on their work and [`Shutdown::recv`], so a stop is noticed at once, without polling.

use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// The sending half, held by whoever decides that pgtide stops.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

impl Trigger {
    /// Tell every [`Shutdown`] to stop. Firing twice is the same as firing once.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

/// Listens for the shutdown signal. Cheap to clone: every task holds its own.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new shutdown signal: the trigger and its first listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Shutdown {
    /// A signal that never fires: single runs (`run-once`, `replay`, ...) end by themselves.
    pub fn never() -> Shutdown {
        channel().1
    }

    /// Whether the signal has fired.
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Wait until the signal fires; at once when it has already.
    pub async fn recv(&mut self) {
        // A trigger dropped without firing can never fire any more.
        if self.0.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Sleep for `d`, or less when the signal fires first; whether it has fired.
    pub async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            () = self.recv() => true,
            () = tokio::time::sleep(d) => self.is_shutdown(),
        }
    }
}

/// SIGINT and SIGTERM, the signals that stop the daemon. The handlers are installed once, so
/// a signal that comes between two waits is not lost.
pub struct Signals {
    term: Signal,
}

impl Signals {
    /// Install the handlers.
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Wait for the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// A crash on purpose, for tests of what a crash at this point leaves behind (debug builds).
pub fn crash_point(name: &str) {
    if cfg!(debug_assertions) && std::env::var_os(name).is_some() {
        eprintln!("pgtide: {name} is set: aborting here");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_one_fire_and_waits_end() {
        let (trigger, shutdown) = channel();
        let mut waiting = shutdown.clone();
        let task = tokio::spawn(async move {
            waiting.recv().await;
            waiting.is_shutdown()
        });
        let mut sleeper = shutdown.clone();
        let sleep = tokio::spawn(async move { sleeper.sleep(Duration::from_secs(3600)).await });
        assert!(!shutdown.is_shutdown());
        tokio::task::yield_now().await;
        assert!(!task.is_finished());

        trigger.fire();
        let woke = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(woke.expect("recv returns after the fire").unwrap());
        let slept = tokio::time::timeout(Duration::from_secs(5), sleep).await;
        assert!(slept.expect("a sleep ends at the fire").unwrap());
        assert!(shutdown.is_shutdown());
        // A listener made after the fire sees it at once.
        let mut late = shutdown.clone();
        tokio::time::timeout(Duration::from_secs(1), late.recv())
            .await
            .expect("recv after the fire returns at once");
    }

    #[tokio::test]
    async fn a_never_signal_sleeps_its_time_and_never_fires() {
        let mut never = Shutdown::never();
        assert!(!never.sleep(Duration::from_millis(10)).await);
        assert!(!never.is_shutdown());
        let waited = tokio::time::timeout(Duration::from_millis(50), never.recv()).await;
        assert!(waited.is_err(), "recv of a never signal must not return");
    }
}
