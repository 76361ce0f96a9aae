//! Applies a layer blob to a directory and prints the report.
//!
//! ```sh
//! cargo run --release --example apply -- layer.tar.gz /tmp/empty-dir [--no-pipeline] [--userxattr]
//! ```

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(blob), Some(dir)) = (args.first(), args.get(1)) else {
        return Err("usage: apply BLOB DIR [--no-pipeline] [--userxattr]".into());
    };
    let opts = strata_unpack::ApplyOptions {
        pipeline: !args.iter().any(|a| a == "--no-pipeline"),
        userxattr: args.iter().any(|a| a == "--userxattr"),
        ..Default::default()
    };
    let file = std::fs::File::open(blob)?;
    let r = strata_unpack::apply(std::io::BufReader::new(file), dir.as_ref(), &opts)?;
    println!("{r:#?}");
    println!(
        "{:.1} MB/s of tar, {:.0} entries/s",
        r.uncompressed_bytes as f64 / r.elapsed.as_secs_f64() / 1e6,
        r.counts.entries as f64 / r.elapsed.as_secs_f64()
    );
    Ok(())
}
