//! `seckill new promotion`: prints a Promotion manifest that opens a given
//! time from now, for `kubectl apply -f -`, as `kubectl create ...
//! --dry-run=client -o yaml` prints a Deployment. The dates are what goes
//! stale in a hand-written manifest, so they are computed here: publishTime
//! is now plus `--opens-in`, finishTime publishTime plus `--lasts`, both RFC
//! 3339 UTC in whole seconds.
//!
//! The manifest is built as JSON and checked by
//! [`seckill_operator::admission::check_manifest`], the rules of the CRD
//! (schema, strict fields, the CEL rule, the name): a value the API server
//! would refuse is refused here with the same field and reason, and what is
//! printed is the object that check accepted.

use chrono::{DateTime, SubsecRound, Utc};
use seckill_operator::admission::check_manifest;
use seckill_operator::promotion::{FieldError, Promotion};
use serde_json::{json, Map};

/// `seckill new ...`: what can be made.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum NewCommand {
    /// Print a Promotion manifest opening --opens-in from now, for
    /// `kubectl apply -f -` (or a file for `seckill up -f`).
    Promotion(PromotionArgs),
}

/// Output formats, as `kubectl -o`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

/// Flags of `seckill new promotion`.
#[derive(clap::Args, Debug, Clone)]
pub struct PromotionArgs {
    /// metadata.name: a DNS-1123 subdomain (e.g. black-friday).
    pub name: String,
    /// metadata.namespace: a DNS-1123 label.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// How long from now until the sale opens (publishTime), e.g. 10m, 30s, 2h.
    #[arg(long)]
    pub opens_in: humantime::Duration,
    /// How long the sale lasts once open (finishTime = publishTime + this), e.g. 1h.
    #[arg(long)]
    pub lasts: humantime::Duration,
    /// numberOfCoupons: how many coupons in total (at least 1).
    #[arg(long, allow_negative_numbers = true)]
    pub coupons: i64,
    /// discount: the fraction off the price, more than 0 and at most 1 (0.2 is 20% off).
    #[arg(long, allow_negative_numbers = true)]
    pub discount: f64,
    /// description: free text for people.
    #[arg(long)]
    pub description: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
}

/// Why no manifest was printed.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    /// A value the CRD refuses: every field and reason.
    #[error("invalid values (as the API server would refuse them):\n{}", list(.0))]
    Invalid(Vec<FieldError>),
    /// --opens-in or --lasts too far away to be a date.
    #[error("{0} is too far in the future to be a date")]
    OutOfRange(&'static str),
    #[error("cannot print the manifest: {0}")]
    Print(String),
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The manifest the flags describe, with `now` as the present, once
/// [`check_manifest`] accepts it.
pub fn promotion(args: &PromotionArgs, now: DateTime<Utc>) -> Result<Promotion, NewError> {
    let later = |from: DateTime<Utc>, by: std::time::Duration, what| {
        chrono::Duration::from_std(by)
            .ok()
            .and_then(|d| from.checked_add_signed(d))
            .ok_or(NewError::OutOfRange(what))
    };
    let publish = later(now.trunc_subsecs(0), *args.opens_in, "--opens-in")?;
    let finish = later(publish, *args.lasts, "--lasts")?;
    let mut spec = Map::new();
    if let Some(description) = &args.description {
        spec.insert("description".into(), description.clone().into());
    }
    spec.insert("publishTime".into(), rfc3339(publish).into());
    spec.insert("finishTime".into(), rfc3339(finish).into());
    spec.insert("numberOfCoupons".into(), args.coupons.into());
    // A NaN or infinite discount has no JSON number: null, which the schema refuses.
    spec.insert("discount".into(), json!(args.discount));
    let manifest = json!({
        "apiVersion": "seckill.io/v1",
        "kind": "Promotion",
        "metadata": {"name": args.name, "namespace": args.namespace},
        "spec": spec,
    });
    check_manifest(&manifest).map_err(NewError::Invalid)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `promotion` printed in `format`, as `kubectl apply -f -` reads it.
pub fn print(promotion: &Promotion, format: Format) -> Result<String, NewError> {
    let print = |e: &dyn std::fmt::Display| NewError::Print(e.to_string());
    match format {
        Format::Yaml => serde_yaml::to_string(promotion)
            .map(quote_times)
            .map_err(|e| print(&e)),
        Format::Json => serde_json::to_string_pretty(promotion)
            .map(|text| text + "\n")
            .map_err(|e| print(&e)),
    }
}

/// The YAML with the two times quoted: YAML 1.1 readers (PyYAML, and
/// tools built on it) take a bare `2026-12-01T14:00:00Z` for a timestamp
/// rather than the string the schema asks for; `kubectl get -o yaml`
/// quotes them for the same reason. The values are ours (RFC 3339, no
/// quote or backslash in them).
fn quote_times(yaml: String) -> String {
    let mut out = String::with_capacity(yaml.len() + 8);
    for line in yaml.lines() {
        let quoted = ["  publishTime: ", "  finishTime: "]
            .iter()
            .find_map(|key| {
                line.strip_prefix(key)
                    .filter(|v| !v.starts_with(['"', '\'']))
                    .map(|v| format!("{key}\"{v}\""))
            });
        out.push_str(quoted.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Runs `seckill new`: the manifest on stdout.
pub fn run(command: &NewCommand) -> Result<(), NewError> {
    match command {
        NewCommand::Promotion(args) => {
            let promotion = promotion(args, Utc::now())?;
            print!("{}", print(&promotion, args.output)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::Value;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        new: NewCommand,
    }

    fn args(flags: &[&str]) -> PromotionArgs {
        let mut argv = vec!["new", "promotion"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv).unwrap().new {
            NewCommand::Promotion(a) => a,
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-12-01T14:00:00.750Z".parse().unwrap()
    }

    /// The flags of a valid sale, one word each.
    fn sale() -> Vec<&'static str> {
        "black-friday --opens-in 10m --lasts 1h --coupons 1000 --discount 0.2"
            .split(' ')
            .collect()
    }

    fn reasons(flags: &[&str]) -> Vec<String> {
        match promotion(&args(flags), now()) {
            Err(NewError::Invalid(errors)) => errors.iter().map(ToString::to_string).collect(),
            other => panic!("accepted or another error: {other:?}"),
        }
    }

    #[test]
    fn the_dates_are_now_plus_opens_in_and_then_plus_lasts_in_whole_utc_seconds() {
        let p = promotion(&args(&sale()), now()).unwrap();
        assert_eq!(
            p.spec.publish_time.to_rfc3339(),
            "2026-12-01T14:10:00+00:00"
        );
        assert_eq!(p.spec.finish_time.to_rfc3339(), "2026-12-01T15:10:00+00:00");
        assert_eq!(p.spec.number_of_coupons, 1000);
        assert_eq!(p.spec.discount, 0.2);
        assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
        let yaml = print(&p, Format::Yaml).unwrap();
        assert!(
            yaml.contains("  publishTime: \"2026-12-01T14:10:00Z\"\n")
                && yaml.contains("  finishTime: \"2026-12-01T15:10:00Z\"\n"),
            "{yaml}"
        );
    }

    #[test]
    fn what_is_printed_in_either_format_is_accepted_by_the_crd_rules_as_it_stands() {
        let mut flags = sale();
        flags.extend(["-n", "shop", "--description", "Black Friday: 20% off"]);
        let p = promotion(&args(&flags), now()).unwrap();
        for format in [Format::Yaml, Format::Json] {
            let text = print(&p, format).unwrap();
            let parsed: Value = serde_yaml::from_str(&text).unwrap();
            assert!(parsed.get("status").is_none(), "{text}");
            let again = check_manifest(&parsed).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
            assert_eq!((&again.metadata, &again.spec), (&p.metadata, &p.spec));
        }
        let value = serde_json::to_value(&p).unwrap();
        assert_eq!(value["metadata"]["namespace"], "shop");
        assert_eq!(value["spec"]["description"], "Black Friday: 20% off");
    }

    #[test]
    fn values_the_crd_refuses_are_refused_with_its_field_and_reason() {
        let with = |flag: &str, value: &str| {
            let mut flags = sale();
            let i = flags.iter().position(|f| *f == flag).unwrap();
            flags[i + 1] = value;
            reasons(&flags)
        };
        for (flag, value, reason) in [
            (
                "--coupons",
                "0",
                "spec.numberOfCoupons: must be at least 1, got 0",
            ),
            (
                "--coupons",
                "-5",
                "spec.numberOfCoupons: must be at least 1, got -5",
            ),
            (
                "--discount",
                "1.5",
                "spec.discount: must be at most 1, got 1.5",
            ),
            (
                "--discount",
                "0",
                "spec.discount: must be more than 0, got 0.0",
            ),
            ("--discount", "NaN", "spec.discount: must not be null"),
        ] {
            assert_eq!(with(flag, value), [reason], "{flag} {value}");
        }
        let lasts = with("--lasts", "0s");
        assert_eq!(lasts.len(), 1);
        assert!(
            lasts[0].starts_with("spec.finishTime: must be after publishTime"),
            "{lasts:?}"
        );
        let mut bad_name = sale();
        bad_name[0] = "Black_Friday";
        let named = reasons(&bad_name);
        assert!(named[0].starts_with("metadata.name: "), "{named:?}");
        let mut bad_namespace = sale();
        bad_namespace.extend(["--namespace", "shop.eu"]);
        assert!(reasons(&bad_namespace)[0].starts_with("metadata.namespace: "));
    }

    #[test]
    fn every_refusal_is_reported_at_once() {
        let flags = [
            "sale",
            "--opens-in",
            "1m",
            "--lasts",
            "0s",
            "--coupons",
            "0",
            "--discount",
            "2",
        ];
        // The schema first (coupons, discount), as the API server does;
        // the CEL rule only runs on a spec within the schema.
        let mut got = reasons(&flags);
        got.sort();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("spec.discount: "), "{got:?}");
        assert!(got[1].starts_with("spec.numberOfCoupons: "), "{got:?}");
    }

    #[test]
    fn opens_in_and_lasts_take_human_durations_and_refuse_others() {
        let a = args(&[
            "s",
            "--opens-in",
            "1h 30m",
            "--lasts",
            "45s",
            "--coupons",
            "1",
            "--discount",
            "1",
            "-o",
            "json",
        ]);
        assert_eq!(a.opens_in.as_secs(), 5400);
        assert_eq!(a.output, Format::Json);
        for bad in ["tomorrow", "-5m", "10"] {
            let argv = [
                "new",
                "promotion",
                "s",
                "--opens-in",
                bad,
                "--lasts",
                "1h",
                "--coupons",
                "1",
                "--discount",
                "1",
            ];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad}");
        }
    }
}
