//! The phase of a promotion, as the scripts write it into the state hash
//! (`phase`), answer it in every snapshot, and the projection writes it into
//! the read model: the one definition every component parses.

use serde::{Deserialize, Serialize};

/// Where a promotion is in its life; ordered as phases rise (a phase never
/// goes back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Registered, waiting for publishTime.
    Pending,
    /// Coupons can be grabbed.
    Active,
    /// Over: sold out, expired or deleted (see the finish reason).
    Finished,
}

impl Phase {
    /// Every phase, in the order they rise.
    pub const ALL: [Phase; 3] = [Self::Pending, Self::Active, Self::Finished];

    /// The phase as the data model spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Active => "Active",
            Self::Finished => "Finished",
        }
    }

    /// The phase spelled `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_reads_back_from_its_spelling_and_serde_agrees() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert_eq!(Phase::parse("pending"), None);
        assert!(Phase::Pending < Phase::Active && Phase::Active < Phase::Finished);
    }
}
