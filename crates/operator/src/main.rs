use virus_scan_operator::{Cli, Command};
use virus_scanner_runtime::env::ProcessEnv;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = virus_scanner_runtime::env::parse(&ProcessEnv);
    match cli.command {
        Some(Command::Crd) => {
            print!("{}", virus_scan_operator::crd::crd_yaml());
            Ok(())
        }
        Some(Command::EnvoyConfig(args)) => {
            print!("{}", virus_scan_operator::envoy_config(&args)?);
            Ok(())
        }
        Some(Command::Check(args)) => {
            let client = kube::Client::try_default().await?;
            let report = virus_scan_operator::check::check(&client, &args).await?;
            print!("{report}");
            if !report.protected {
                std::process::exit(1);
            }
            Ok(())
        }
        Some(Command::RedisAcl(args)) => {
            print!("{}", args.lines()?);
            Ok(())
        }
        Some(Command::Run) | None => {
            virus_scanner_runtime::init_tracing(cli.run.log_format);
            virus_scan_operator::run(cli.run).await?;
            Ok(())
        }
    }
}
