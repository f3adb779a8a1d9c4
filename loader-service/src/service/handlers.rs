//! The `Loader` RPCs: listing datasets and describing them, streaming batches, single samples
//! and the global statistics.

use std::sync::atomic::Ordering;

use atmorep_proto::calendar::{TimeFormat, format_time};
use atmorep_proto::pb;
use atmorep_proto::pb::loader_server::Loader;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::request::{Limits, MAX_PE_WIDTH};
use super::stream::{Outgoing, Replies, StreamTask, serve_stream};
use super::wire::to_wire;
use super::{LoaderService, Served, failed, status};
use crate::pipeline::epoch::EpochCursor;
use crate::pipeline::{BatchSpec, Pipeline, PipelineError};
use crate::store::dataset::Dataset;

/// The sample a `GetSample` selector names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum SampleTarget {
    ById {
        epoch: u64,
        id: u64,
    },
    ByCentre {
        time_index: usize,
        lat: f64,
        lon: f64,
    },
}

pub(super) fn sample_target(
    pipeline: &Pipeline,
    selector: Option<pb::sample_request::Selector>,
) -> Result<SampleTarget, Status> {
    match selector {
        Some(pb::sample_request::Selector::ById(by)) => {
            if by.id >= pipeline.num_samples() {
                return Err(Status::invalid_argument(format!(
                    "by_id.id: sample {} is outside 0..{}",
                    by.id,
                    pipeline.num_samples()
                )));
            }
            Ok(SampleTarget::ById {
                epoch: by.epoch,
                id: by.id,
            })
        }
        Some(pb::sample_request::Selector::ByCentre(at)) => {
            let times = &pipeline.dataset().times;
            let time_index = match at.time {
                Some(pb::sample_by_centre::Time::TimeIndex(i)) => usize::try_from(i)
                    .ok()
                    .filter(|&i| i < times.len())
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "by_centre.time_index: {i} is outside 0..{}",
                            times.len()
                        ))
                    }),
                Some(pb::sample_by_centre::Time::IsoTime(text)) => {
                    atmorep_proto::calendar::parse_iso(&text)
                        .map_err(|e| Status::invalid_argument(format!("by_centre.iso_time: {e}")))
                        .and_then(|t| {
                            times.binary_search(&t).map_err(|_| {
                                Status::not_found(format!(
                                    "by_centre.iso_time: the dataset has no step at {text}"
                                ))
                            })
                        })
                }
                None => Err(Status::invalid_argument("by_centre.time: missing")),
            }?;
            Ok(SampleTarget::ByCentre {
                time_index,
                lat: at.lat,
                lon: at.lon,
            })
        }
        None => Err(Status::invalid_argument("selector: missing")),
    }
}

#[tonic::async_trait]
impl Loader for LoaderService {
    async fn list_datasets(
        &self,
        _request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let datasets = self
            .state
            .datasets
            .values()
            .map(|s| {
                let (start, end) = time_bounds(&s.dataset);
                pb::DatasetSummary {
                    name: s.config.name.clone(),
                    description: s.config.description.clone(),
                    variables: s.dataset.variables.keys().cloned().collect(),
                    time_start: start,
                    time_end: end,
                }
            })
            .collect();
        Ok(Response::new(pb::ListDatasetsResponse { datasets }))
    }

    async fn get_dataset_info(
        &self,
        request: Request<pb::DatasetInfoRequest>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        let served = self.served(&request.get_ref().dataset).map_err(failed)?;
        Ok(Response::new(dataset_info(served, self.limits())))
    }

    type StreamBatchesStream = Replies;

    async fn stream_batches(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<Response<Self::StreamBatchesStream>, Status> {
        let request = request.into_inner();
        let slot = self.stream_slot().map_err(failed)?;
        let (parsed, _) = self.price(&request, self.limits()).map_err(failed)?;
        let (parsed, pipeline) = self.build_off_worker(parsed).await.map_err(failed)?;
        let config = &self.state.config;
        let batches = pipeline
            .batches(BatchSpec {
                rank: parsed.rank,
                world: parsed.world,
                start: parsed.resume,
                end_epoch: parsed.end_epoch,
                batch_size: parsed.batch_size,
                sample_concurrency: config.sample_concurrency,
                prefetch_batches: config.prefetch_batches,
                memory: Some(self.state.budget.clone()),
            })
            .map_err(|e| failed(status::from_pipeline(&e)))?;
        let stream_id = self.state.next_stream.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("stream", id = stream_id, dataset = %parsed.dataset);
        tracing::info!(
            parent: &span,
            rank = parsed.rank,
            world = parsed.world,
            batch_size = parsed.batch_size,
            resume = ?parsed.resume,
            end_epoch = ?parsed.end_epoch,
            "stream opened"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let max_bytes = config.max_message_mib << 20;
        let dataset = self.served(&parsed.dataset)?.dataset.clone();
        let shutdown = self.state.shutdown.clone();
        let on_panic = tx.clone();
        let serve = serve_stream(StreamTask {
            pipeline,
            batches,
            tx,
            parsed,
            max_bytes,
            dataset,
            shutdown,
            idle_timeout: std::time::Duration::from_secs(config.stream_idle_timeout_s),
            _slot: slot,
        });
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                // Without this the client would see its stream end with OK and no `last` batch.
                if let Err(panicked) = crate::panic::contain("stream task", serve).await {
                    metrics::gauge!("atmorep_streams_active").decrement(1.0);
                    let status = failed(Status::internal(panicked.to_string()));
                    let _ = on_panic.send(Outgoing::error(status)).await;
                }
            },
            span,
        ));
        Ok(Response::new(Replies(ReceiverStream::new(rx))))
    }

    async fn get_sample(
        &self,
        request: Request<pb::SampleRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let request = request.into_inner();
        let (parsed, cost) = self.price_sample(request.request).map_err(failed)?;
        let reservation = self.sample_reservation(&cost).map_err(failed)?;
        let (parsed, pipeline) = self.build_off_worker(parsed).await.map_err(failed)?;
        let target = sample_target(&pipeline, request.selector).map_err(failed)?;
        // Contained here: a panic escaping the handler would end the client's whole connection.
        let sample = crate::panic::contain("GetSample", async {
            match target {
                SampleTarget::ById { epoch, id } => pipeline.sample(epoch, id).await,
                SampleTarget::ByCentre {
                    time_index,
                    lat,
                    lon,
                } => pipeline.sample_at(0, time_index, lat, lon).await,
            }
        })
        .await
        .map_err(PipelineError::from)
        .and_then(|sample| sample)
        .map_err(|e| failed(status::from_pipeline(&e)))?;
        let cursor = EpochCursor::default();
        // One message whatever its size: a unary reply has no parts.
        let mut parts = to_wire(
            &pipeline,
            vec![sample],
            0,
            cursor,
            true,
            parsed.dtype,
            usize::MAX,
        );
        let mut message = parts.pop().expect("one sample makes one part");
        hold_until_encoded(&mut message, reservation);
        Ok(Response::new(message))
    }

    async fn get_statistics(
        &self,
        request: Request<pb::StatisticsRequest>,
    ) -> Result<Response<pb::Statistics>, Status> {
        let request = request.into_inner();
        let served = self.served(&request.dataset).map_err(failed)?;
        let stats = served.stats.as_ref().ok_or_else(|| {
            failed(Status::failed_precondition(format!(
                "dataset: `{}` has no global statistics (run `atmorep loader stats` on its store)",
                request.dataset
            )))
        })?;
        // Either ERA5 name works; the moments come back under the name asked for.
        let mut asked: Vec<(&str, &str)> = Vec::with_capacity(request.variables.len());
        for name in &request.variables {
            let stored = served.dataset.resolve_name(name).map_err(|e| {
                failed(Status::not_found(format!(
                    "variables: dataset `{}`: {e}",
                    request.dataset
                )))
            })?;
            if !stats.iter().any(|(field, ..)| field == stored) {
                return Err(failed(Status::failed_precondition(format!(
                    "variables: `{name}` of dataset `{}` has no global statistics",
                    request.dataset
                ))));
            }
            asked.push((stored, name));
        }
        let global = stats
            .iter()
            .flat_map(|(field, level, year, month, m)| {
                let names: Vec<&str> = if asked.is_empty() {
                    vec![field]
                } else {
                    asked
                        .iter()
                        .filter(|(stored, _)| *stored == field)
                        .map(|(_, name)| *name)
                        .collect()
                };
                names.into_iter().map(move |name| pb::MonthlyMoments {
                    variable: name.to_string(),
                    level,
                    year,
                    month,
                    count: m.count,
                    mean: m.mean,
                    std: m.std(),
                    min: m.min,
                    max: m.max,
                })
            })
            .collect();
        Ok(Response::new(pb::Statistics { global }))
    }
}

/// Ties `reservation` to `message`'s first tensor, so that it ends when tonic drops the message
/// after encoding it, not when the handler returns (the encoded copy still counts).
fn hold_until_encoded(message: &mut pb::Batch, reservation: OwnedSemaphorePermit) {
    /// A tensor's bytes and the budget they were built under.
    struct Held {
        data: bytes::Bytes,
        _reservation: OwnedSemaphorePermit,
    }
    impl AsRef<[u8]> for Held {
        fn as_ref(&self) -> &[u8] {
            &self.data
        }
    }
    let tensor = message
        .fields
        .iter_mut()
        .flat_map(|f| [&mut f.source, &mut f.target, &mut f.token_info, &mut f.pe])
        .flatten()
        .next();
    if let Some(tensor) = tensor {
        let data = std::mem::take(&mut tensor.data);
        tensor.data = bytes::Bytes::from_owner(Held {
            data,
            _reservation: reservation,
        });
    }
}

fn time_bounds(dataset: &Dataset) -> (String, String) {
    let iso = |t: i64| format_time(t, TimeFormat::Iso);
    (
        dataset.times.first().map(|&t| iso(t)).unwrap_or_default(),
        dataset.times.last().map(|&t| iso(t)).unwrap_or_default(),
    )
}

fn dataset_info(served: &Served, limits: Limits) -> pb::DatasetInfo {
    let ds = &served.dataset;
    let (start, end) = time_bounds(ds);
    let step_hours = if ds.times.len() > 1 {
        (ds.times[1] - ds.times[0]) as f64 / 3600.0
    } else {
        0.0
    };
    let lon_step = if ds.lons.len() > 1 {
        ds.lons[1] - ds.lons[0]
    } else {
        0.0
    };
    let lat_step = if ds.lats.len() > 1 {
        ds.lats[1] - ds.lats[0]
    } else {
        0.0
    };
    let mut global: Vec<String> = Vec::new();
    let (mut first, mut last) = (i32::MAX, i32::MIN);
    if let Some(stats) = &served.stats {
        for (field, _, year, _, _) in stats.iter() {
            if !global.iter().any(|g| g == field) {
                global.push(field.to_string());
            }
            first = first.min(year);
            last = last.max(year);
        }
    }
    pb::DatasetInfo {
        name: served.config.name.clone(),
        description: served.config.description.clone(),
        variables: ds
            .variables
            .values()
            .map(|v| pb::VariableInfo {
                name: v.name.clone(),
                long_name: v.long_name.clone().unwrap_or_default(),
                units: v.units.clone().unwrap_or_default(),
                levels: v.levels.clone(),
                dims: v
                    .roles
                    .iter()
                    .map(|r| format!("{r:?}").to_lowercase())
                    .collect(),
                chunk_shape: v.chunk_shape(),
                stored_dtype: v.stored_dtype.clone(),
            })
            .collect(),
        grid: Some(pb::Grid {
            nlat: ds.lats.len() as u32,
            nlon: ds.lons.len() as u32,
            lat_first: ds.lats.first().copied().unwrap_or_default(),
            lat_step,
            lon_first: ds.lons.first().copied().unwrap_or_default(),
            lon_step,
        }),
        time: Some(pb::TimeAxis {
            start,
            end,
            start_unix: ds.times.first().copied().unwrap_or_default(),
            end_unix: ds.times.last().copied().unwrap_or_default(),
            step_hours,
            count: ds.times.len() as u64,
        }),
        statistics: Some(pb::StatisticsSummary {
            global,
            local: served
                .local
                .as_ref()
                .map(|l| l.fields.keys().cloned().collect())
                .unwrap_or_default(),
            global_first_year: if first <= last { first } else { 0 },
            global_last_year: if first <= last { last } else { 0 },
            global_coverage: served.stats.as_ref().and_then(|s| s.coverage()).map(|c| {
                pb::StatisticsCoverage {
                    first_step: format_time(c.first_step, TimeFormat::Iso),
                    last_step: format_time(c.last_step, TimeFormat::Iso),
                    every_steps: c.every_steps as u32,
                    steps_read: c.steps_read as u64,
                    store_steps: c.store_steps as u64,
                    variables: c.variables.clone(),
                    levels: c.levels.clone(),
                }
            }),
        }),
        geometry: Some(pb::ServableGeometry {
            max_window: vec![
                ds.times.len() as u32,
                ds.lats.len() as u32,
                ds.lons.len() as u32,
            ],
            max_tokens: limits.request.max_tokens_per_sample,
            max_batch_size: limits.max_batch_size,
            pe_modes: atmorep_proto::PeMode::ALL
                .iter()
                .map(|&m| pb::PeMode::from(m) as i32)
                .collect(),
            max_pe_width: MAX_PE_WIDTH,
            max_batch_bytes: limits.request.batch_limit().0,
            max_window_bytes: limits.request.max_window_mib.saturating_mul(1 << 20),
            max_samples_per_epoch: limits.request.max_samples_per_epoch,
            max_blur_sigma: limits.request.blur_sigma_on(ds.lats.len()),
        }),
    }
}
