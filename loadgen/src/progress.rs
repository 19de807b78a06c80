//! A progress bar for a timed measurement (drawn on stderr when it is a terminal, hidden
//! otherwise), cleared when the measurement ends.

use std::time::{Duration, Instant};

pub struct Timed {
    bar: indicatif::ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

/// Show `label` with a bar that fills over `duration`.
pub fn timed(label: &str, duration: Duration) -> Timed {
    let bar = indicatif::ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {label} [{{bar:30}}] {{elapsed}}/{}s",
            duration.as_secs()
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let start = Instant::now();
    let ticker = tokio::spawn(async move {
        loop {
            b.set_position(start.elapsed().as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Timed { bar, ticker }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// A spinner for a measurement of unknown length, cleared on drop.
pub struct Spinner(indicatif::ProgressBar);

/// Show `label` with a spinner.
pub fn spinner(label: &str) -> Spinner {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(label.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    Spinner(bar)
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
