//! One device-plugin gRPC service per pool, serving what the manager last published
//! for it.

use crate::allocate;
use crate::api::deviceplugin as dp;
use crate::config::ResourceConfig;
use crate::pool::PoolDevice;
use futures_util::StreamExt;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// A pool as served: its resource config and devices (with health) right now.
#[derive(Debug, Clone)]
pub struct PoolState {
    pub resource: ResourceConfig,
    pub devices: Vec<PoolDevice>,
}

pub struct PoolService {
    state: watch::Receiver<Arc<PoolState>>,
}

impl PoolService {
    pub fn new(state: watch::Receiver<Arc<PoolState>>) -> PoolService {
        PoolService { state }
    }

    fn now(&self) -> Arc<PoolState> {
        self.state.borrow().clone()
    }
}

pub const API_VERSION: &str = "v1beta1";

pub fn options() -> dp::DevicePluginOptions {
    dp::DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

type ListStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl dp::device_plugin_server::DevicePlugin for PoolService {
    async fn get_device_plugin_options(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = ListStream;

    /// The list now, then again whenever a device appears, goes, or changes health.
    async fn list_and_watch(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let stream = tokio_stream::wrappers::WatchStream::new(self.state.clone()).map(|s| {
            Ok(dp::ListAndWatchResponse {
                devices: allocate::device_list(&s.resource, &s.devices),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let s = self.now();
        let container_responses = req
            .into_inner()
            .container_requests
            .iter()
            .map(|c| dp::ContainerPreferredAllocationResponse {
                device_i_ds: allocate::preferred(
                    &s.devices,
                    &c.available_device_i_ds,
                    &c.must_include_device_i_ds,
                    c.allocation_size.max(0) as usize,
                ),
            })
            .collect();
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        req: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let s = self.now();
        let mut container_responses = Vec::new();
        for c in req.into_inner().container_requests {
            let r = allocate::container_response(&s.resource, &s.devices, &c.devices_ids)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            tracing::info!(pool = %s.resource.full_name(), devices = ?c.devices_ids, "allocated");
            container_responses.push(r);
        }
        Ok(Response::new(dp::AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}
