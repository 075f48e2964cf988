//! How the admin commands report progress, without drawing anything: the
//! library says what it is doing and how far it got; the binary decides
//! whether and how to show it (progress bars on a terminal), and tests
//! pass [`Silent`].

/// What a count is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Bytes (shown with rate and time left).
    Bytes,
    /// Things named by the label, e.g. `"fallback tags"`.
    Items(&'static str),
}

/// How a piece of work ended, for its last line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Nothing worth keeping on screen: the command prints its own report.
    Clear,
    /// Finished; the line stays with this text.
    Done(&'a str),
    /// Gave up on part of it; the line stays with this text.
    Failed(&'a str),
}

/// A progress line. Every method has a default that does nothing, so a
/// reporter implements only what it shows.
///
/// Work starts with an unknown size ([`message`](Progress::message) says
/// which phase), may then count toward a known total
/// ([`count`](Progress::count), [`advance`](Progress::advance)), and ends
/// with [`finish`](Progress::finish) — on every path, errors included, so a
/// terminal display can stop redrawing before an error is printed.
pub trait Progress: Send + Sync {
    /// What is being done now.
    fn message(&self, _message: &str) {}

    /// From now on, counts toward `total` in `unit`, starting at zero.
    fn count(&self, _total: u64, _unit: Unit) {}

    /// `n` more done.
    fn advance(&self, _n: u64) {}

    /// The work is over.
    fn finish(&self, _outcome: Outcome<'_>) {}

    /// A further line for a separate piece of work shown beside this one
    /// (`graft cache warm` uses one per image).
    fn line(&self) -> Box<dyn Progress> {
        Box::new(Silent)
    }
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Progress for Silent {}
