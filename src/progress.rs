//! Progress bars for the admin commands (binary only: the library reports
//! through [`graft::admin::Progress`] and never draws). indicatif draws only
//! when stderr is a terminal, so piped runs and tests see no bars.

use std::time::Duration;

use graft::admin::{Outcome, Progress, Unit};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

const TICK: Duration = Duration::from_millis(120);

/// One line: a spinner with a message until a total is known, then a bar.
#[derive(Clone)]
pub struct Bar(ProgressBar);

impl Bar {
    /// A line drawn on stderr.
    pub fn new() -> Bar {
        Bar::spinning(ProgressBar::new_spinner())
    }

    fn spinning(bar: ProgressBar) -> Bar {
        bar.set_style(spinner_style());
        bar.enable_steady_tick(TICK);
        Bar(bar)
    }

    /// Runs `f` with the bar lifted out of the way, so that what `f` writes
    /// to the terminal is not overwritten.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.0.suspend(f)
    }
}

impl Progress for Bar {
    fn message(&self, message: &str) {
        self.0.set_message(message.to_string());
    }

    fn count(&self, total: u64, unit: Unit) {
        self.0.set_style(bar_style(unit));
        self.0.set_length(total);
        self.0.set_position(0);
    }

    fn advance(&self, n: u64) {
        self.0.inc(n);
    }

    fn finish(&self, outcome: Outcome<'_>) {
        match outcome {
            Outcome::Clear => self.0.finish_and_clear(),
            Outcome::Done(m) => self.0.finish_with_message(m.to_string()),
            Outcome::Failed(m) => self.0.abandon_with_message(m.to_string()),
        }
    }
}

/// Several lines, one per [`Progress::line`], drawn together.
pub struct Lines(MultiProgress);

impl Lines {
    pub fn new() -> Lines {
        Lines(MultiProgress::new())
    }
}

impl Progress for Lines {
    fn line(&self) -> Box<dyn Progress> {
        Box::new(Bar::spinning(self.0.add(ProgressBar::new_spinner())))
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {wide_msg}").expect("a valid literal template")
}

fn bar_style(unit: Unit) -> ProgressStyle {
    let template = match unit {
        Unit::Bytes => {
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
                .to_string()
        }
        // Labels are literals of the library's; braces would be placeholders.
        Unit::Items(label) => format!(
            "{{spinner}} [{{bar:30}}] {{pos}}/{{len}} {}  {{wide_msg}}",
            label.replace(['{', '}'], "")
        ),
    };
    ProgressStyle::with_template(&template)
        .expect("a valid template")
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse() {
        let _ = spinner_style();
        let _ = bar_style(Unit::Bytes);
        let _ = bar_style(Unit::Items("fallback tags"));
    }
}
