//! `seckill load --report` looked at as a person would: a real sale
//! (`seckill new promotion` into the files of a `seckill up`, then a crowd
//! from `seckill load --report`), the page rendered by headless Chromium to
//! a PNG and to its DOM. The DOM must hold the three plots, with their
//! series and the publish and sell-out markers, and the verdict; the PNG
//! must be the page drawn (the verdict's colour, the series' colours, ink
//! on a good share of it), not a blank or an error page.
//!
//! Chromium is Debian's `chromium` (`scripts/install-deps.sh chromium`,
//! which `make test` runs), or the binary `SECKILL_CHROMIUM` names; without
//! one the test says so and is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use seckill_testkit::process::{binary, SECKILL};
use seckill_testkit::up::Up;

/// The Chromium to render with, or why there is none.
fn chromium() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("SECKILL_CHROMIUM") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("SECKILL_CHROMIUM={} is not a file", path.display()))
        };
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "no chromium on PATH (scripts/install-deps.sh chromium installs Debian's; \
             or set SECKILL_CHROMIUM)"
                .to_owned()
        })
}

/// Headless Chromium on `page` with `extra` flags (a fresh profile each
/// time, nothing fetched, no GPU); its stdout.
fn render(chromium: &Path, page: &Path, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `seckill <args>` run to its end, off the async runtime.
async fn seckill(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(binary(SECKILL))
            .args(args)
            .output()
            .expect("seckill runs")
    })
    .await
    .expect("seckill's task")
}

/// The decoded PNG: width, height and RGB pixels.
fn pixels(png_file: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::fs::File::open(png_file).unwrap());
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).expect("a PNG frame");
    let step = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    let rgb = buf[..frame.buffer_size()]
        .chunks_exact(step)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (frame.width, frame.height, rgb)
}

/// Whether pixel `p` is within a small distance of the colour `hex` (#rrggbb).
fn near(p: &[u8; 3], hex: &str) -> bool {
    let c = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap();
    let want = [
        (c >> 16) as i32,
        ((c >> 8) & 0xff) as i32,
        (c & 0xff) as i32,
    ];
    (0..3).map(|i| (p[i] as i32 - want[i]).abs()).sum::<i32>() <= 24
}

/// Pixels near the colour `hex`.
fn count_near(pixels: &[[u8; 3]], hex: &str) -> usize {
    pixels.iter().filter(|p| near(p, hex)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_report_of_a_real_sale_renders_in_chromium_with_its_plots_markers_and_verdict() {
    let chromium = match chromium() {
        Ok(path) => path,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let files = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let up = Up::start(&["-f", files.path().to_str().unwrap()], None).await;

    // A sale that opens three to four seconds from now, printed by
    // `seckill new` and picked up by `seckill up` from its files.
    let manifest = seckill(
        [
            "new",
            "promotion",
            "report",
            "--namespace",
            "demo",
            "--opens-in",
            "4s",
            "--lasts",
            "10m",
            "--coupons",
            "300",
            "--discount",
            "0.5",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(manifest.status.success(), "{manifest:?}");
    std::fs::write(files.path().join("report.yaml"), &manifest.stdout).unwrap();
    up.wait_said("demo/report: Scheduled").await;

    let page = out.path().join("report.html");
    let mut load = vec![
        "load".to_owned(),
        "--target".to_owned(),
        up.url(),
        "--report".to_owned(),
        page.to_str().unwrap().to_owned(),
    ];
    // --duration bounds a hang; how fast is make bench's business.
    load.extend(
        [
            "--promotion",
            "demo/report",
            "--customers",
            "3000",
            "--concurrency",
            "32",
            "--duration",
            "120s",
        ]
        .map(String::from),
    );
    let load = seckill(load).await;
    let said = String::from_utf8_lossy(&load.stdout);
    assert!(load.status.success(), "{said}\n{load:?}");
    assert!(said.contains("verification: PASSED"), "{said}");
    let html = std::fs::read_to_string(&page).unwrap();
    for forbidden in ["<script", "src=", "href=", "url("] {
        assert!(
            !html.contains(forbidden),
            "the page fetches or runs something: {forbidden}"
        );
    }

    // What the browser built from it.
    let dom = render(&chromium, &page, &["--dump-dom"]);
    for id in ["plot-throughput", "plot-latency", "plot-coupons"] {
        let at = dom
            .find(&format!(r#"<svg id="{id}""#))
            .unwrap_or_else(|| panic!("no <svg id={id}> in the DOM:\n{dom}"));
        let plot = &dom[at..at + dom[at..].find("</svg>").unwrap()];
        assert!(plot.contains("<polyline"), "{id} draws no line");
        assert!(
            plot.contains("time since the load started (s)"),
            "{id}: x axis"
        );
        assert!(
            plot.contains(">publishTime<") && plot.contains(">sold out (last coupon granted)<"),
            "{id}: the publish and sell-out markers"
        );
    }
    for series in [
        r#"data-series="granted""#,
        r#"data-series="soldOut""#,
        r#"data-series="notStarted""#,
        r#"data-series="p50""#,
        r#"data-series="p99""#,
        r#"data-series="by the grants answered""#,
    ] {
        assert!(dom.contains(series), "{series} missing");
    }
    assert!(dom.contains(r#"<section id="verdict" class="passed">"#));
    assert!(dom.contains("Verification PASSED"));
    assert!(dom.contains("exactly min(coupons, customers) = 300 granted"));

    // What a person would see.
    let png_file = out.path().join("report.png");
    render(
        &chromium,
        &page,
        &[&format!("--screenshot={}", png_file.display())],
    );
    let (width, height, rgb) = pixels(&png_file);
    assert_eq!((width, height), (1280, 2000));
    let ink = rgb
        .iter()
        .filter(|p| !near(p, "#fafafa") && !near(p, "#ffffff"))
        .count();
    println!("{ink} of {} pixels are not background", rgb.len());
    assert!(
        ink > rgb.len() / 20,
        "only {ink} of {} pixels are not background",
        rgb.len()
    );
    for (what, colour, at_least) in [
        ("the PASSED box", "#e8f6ea", 20_000),
        ("the granted line", "#2ca02c", 150),
        ("the sold-out line (orange, as p90)", "#ff7f0e", 150),
        ("the p99 line", "#d62728", 150),
        ("the p50 and coupons lines", "#1f77b4", 150),
    ] {
        let n = count_near(&rgb, colour);
        println!("{what}: {n} pixels of {colour}");
        assert!(n >= at_least, "{what}: {n} pixels of {colour}");
    }
}
