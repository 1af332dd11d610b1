//! Devices for pods: SR-IOV VFs (and PFs without VFs) found in sysfs and DPDK
//! vhost-user sockets found in directories, grouped into resource pools by
//! sriov-network-device-plugin compatible selectors.

pub mod allocate;
pub mod config;
pub mod glob;
pub mod manager;
pub mod names;
pub mod podresources;
pub mod pool;
pub mod report;
pub mod server;
pub mod uds;
pub mod vhost;

/// The kubelet APIs, generated from `proto/`.
pub mod api {
    pub mod deviceplugin {
        tonic::include_proto!("v1beta1");
    }
    pub mod podresources {
        tonic::include_proto!("v1");
    }
}
