use kindred_profile_api::{app, read_only_from_env, reads_app, Config};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    kindred_aws::lambda::init_logging();
    let sdk = kindred_aws::lambda::sdk_config().await;
    let config = Config::load_with_secrets(&sdk).await?;
    if read_only_from_env() {
        lambda_http::run(kindred_http::with_emf(
            reads_app(&config, &sdk),
            "profile-reads",
        ))
        .await
    } else {
        lambda_http::run(kindred_http::with_emf(app(&config, &sdk), "profile-api")).await
    }
}
