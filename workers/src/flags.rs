//! Command-line flags as values: the defaults of a clap flag struct, taken
//! from its own `#[arg(default_value...)]` attributes, so that a `Default`
//! impl (or an options struct built without a command line) never retypes a
//! default and cannot drift from `--help`.

use clap::{Args, Command, FromArgMatches};

/// The value of `T` when no flag is given: clap's defaults, with the
/// environment ignored (an environment variable is a setting of the
/// process, not a default).
///
/// Panics when `T` has a required flag: such a struct has no default, and
/// calling this for it is a programming error caught by its unit test.
pub fn defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(Command::new("defaults")).mut_args(|arg| arg.env(None));
    let matches = command
        .try_get_matches_from(["defaults"])
        .unwrap_or_else(|e| panic!("{} has a required flag: {e}", std::any::type_name::<T>()));
    T::from_arg_matches(&matches)
        .unwrap_or_else(|e| panic!("{} has no default: {e}", std::any::type_name::<T>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Args, Debug, PartialEq)]
    struct Example {
        #[arg(long, env = "SECKILL_FLAGS_TEST_EXAMPLE", default_value_t = 7)]
        count: u32,
        #[arg(long)]
        name: Option<String>,
    }

    #[test]
    fn defaults_come_from_the_attributes_and_ignore_the_environment() {
        std::env::set_var("SECKILL_FLAGS_TEST_EXAMPLE", "99");
        let d: Example = defaults();
        assert_eq!(
            d,
            Example {
                count: 7,
                name: None
            }
        );
    }
}
