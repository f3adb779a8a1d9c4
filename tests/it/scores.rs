//! The evaluation's references against a real loader: the per-grid-point climatology of the
//! training split, streamed as global tiles from a loader process, equals the mean of the store's
//! own training-split values per point and hour of day — and the test period, which it never
//! saw, differs from it.

use atmorep_loader::{Dataset, Hyperslab};
use atmorep_proto::client::{ClientConfig, LoaderClient};
use atmorep_proto::request::RequestConfig;
use atmorep_testkit::Server;
use atmorep_testkit::tiny::{store_with_stats, tiny_config};
use atmorep_trainer::climatology;
use atmorep_trainer::eval::FieldLayout;
use tempfile::TempDir;

/// 2020-09-01 + 6 days: 24 training steps of 6 h, each hour of day 6 times.
const TRAIN_END: &str = "2020-09-07T00:00:00Z";
const VALIDATION_END: &str = "2020-09-08T12:00:00Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_point_climatology_is_the_training_mean_per_point_and_hour() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "tiny.zarr", &tiny_config(40)).await;
    let server = Server::start(
        &["--dataset".into(), format!("tiny={}", store.display())],
        &dir.path().join("server.log"),
    );
    let client = LoaderClient::connect(ClientConfig::new([server.endpoint()]))
        .await
        .unwrap();
    let request = RequestConfig::from_toml(&format!(
        "dataset = \"tiny\"\ntrain_end = \"{TRAIN_END}\"\nvalidation_end = \
         \"{VALIDATION_END}\"\n\n[[fields]]\nname = \"t\"\nlevels = [850, 500]\n\
         num_tokens = [2, 3, 6]\ntoken_size = [1, 3, 3]\npe = \"local\"\npe_width = 8\n\
         mask = {{ kind = \"bert\", r_max = 0.5 }}\n"
    ))
    .unwrap();
    let layouts = vec![FieldLayout::from_request(&request.fields[0]).unwrap()];
    let clim = climatology::from_loader(&client, &request, &layouts)
        .await
        .unwrap();
    assert!(clim.is_diurnal());
    assert_eq!(clim.steps("t", 850.0), 24);

    // The known answer, straight from the store.
    let truth = Dataset::open(store.to_str().unwrap()).await.unwrap();
    let var = truth.variable("t").unwrap();
    let values = truth.read(&Hyperslab::full(&truth, var)).await.unwrap();
    let (nlat, nlon, nl) = (truth.lats.len(), truth.lons.len(), var.levels.len());
    let plane = nlat * nlon;
    let train_steps = 24;
    for (l, &level) in var.levels.iter().enumerate() {
        for hour in 0..4 {
            let unix = truth.times[hour];
            let means = clim.at("t", level, unix).unwrap();
            let mut test_gap = 0.0f64;
            for p in 0..plane {
                let at = |t: usize| f64::from(values[(t * nl + l) * plane + p]);
                let want = (hour..train_steps).step_by(4).map(at).sum::<f64>() / 6.0;
                let got = means.mean(p / nlon, p % nlon).unwrap();
                assert!(
                    (got - want).abs() < 1e-6 * want.abs().max(1.0),
                    "level {level}, {hour}th hour, point {p}: {got} vs {want}"
                );
                // The last step of this hour, in the test period.
                let last = (train_steps..truth.times.len())
                    .rev()
                    .find(|t| t % 4 == hour);
                test_gap += (at(last.unwrap()) - got).abs();
            }
            assert!(
                test_gap / plane as f64 > 1e-3,
                "level {level}: test = climatology"
            );
        }
    }
}
