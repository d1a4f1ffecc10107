use kindred_ingest::{app, Config};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    kindred_aws::lambda::init_logging();
    let config = Config::load()?;
    let sdk = kindred_aws::lambda::sdk_config().await;
    lambda_http::run(kindred_http::with_emf(app(&config, &sdk), "ingest")).await
}
