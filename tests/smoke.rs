mod support;
use std::time::Duration;

#[tokio::test]
async fn a_scale_up_on_the_simulated_cloud_reaches_running() {
    let (server, mut c) = support::start(
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 3\n",
    )
    .await;
    support::increase(&mut c, "g", 2).await.unwrap();
    assert_eq!(support::target_size(&mut c, "g").await, 2);
    let ids = support::wait_running(&c, "g", 2, Duration::from_secs(5)).await;
    assert!(ids.iter().all(|id| id.starts_with("simulated://t/t-g-")));
    server.stop().await.unwrap();
}
