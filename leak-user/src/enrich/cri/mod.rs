//! The container runtime interface, over the runtime's unix socket: gRPC calls by method
//! name with the messages of [`proto`]. The agent asks it for the names of containers the
//! kubelet's log directories do not name ([`CriNames`]); the test kubelet drives pods with it.

pub mod proto;

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tonic::{client::Grpc, transport::Channel};

use self::proto::{
    Container, ContainerFilter, ListContainersRequest, ListContainersResponse, PodSandboxRequest,
    PodSandboxStatusResponse, VersionRequest, VersionResponse,
};

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to the container runtime at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("the container runtime at {path} answered {method} with {status}")]
    Call {
        path: PathBuf,
        method: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("cannot start the container runtime client: {0}")]
    Runtime(std::io::Error),
}

/// How long one call may take: the agent names a kill while it serves it, and a runtime that
/// hangs must not hold the kill back for long.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to a runtime's CRI socket.
#[derive(Clone)]
pub struct Cri {
    path: PathBuf,
    grpc: Grpc<Channel>,
}

impl Cri {
    /// Connects to the socket at `path`; `timeout` bounds the connection and every call.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, CriError> {
        let socket = path.to_owned();
        // The URI is required by the API and unused: every connection goes to the socket.
        let channel = tonic::transport::Endpoint::from_static("http://cri.invalid")
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| CriError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            grpc: Grpc::new(channel),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One unary call of `runtime.v1.RuntimeService`; `method` is its name (`Version`).
    pub async fn call<Request, Response>(
        &mut self,
        method: &'static str,
        request: Request,
    ) -> Result<Response, CriError>
    where
        Request: prost::Message + Send + Sync + 'static,
        Response: prost::Message + Default + Send + Sync + 'static,
    {
        let failed = |path: &Path, status: tonic::Status| CriError::Call {
            path: path.to_owned(),
            method,
            status: Box::new(status),
        };
        self.grpc.ready().await.map_err(|err| {
            failed(
                &self.path,
                tonic::Status::unavailable(format!("connection not ready: {err}")),
            )
        })?;
        let route = PathAndQuery::try_from(format!("{}{method}", proto::SERVICE))
            .map_err(|err| failed(&self.path, tonic::Status::internal(err.to_string())))?;
        let codec = tonic_prost::ProstCodec::<Request, Response>::default();
        match self
            .grpc
            .unary(tonic::Request::new(request), route, codec)
            .await
        {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(failed(&self.path, status)),
        }
    }

    pub async fn version(&mut self) -> Result<VersionResponse, CriError> {
        self.call(
            "Version",
            VersionRequest {
                version: "v1".into(),
            },
        )
        .await
    }

    /// The container with this id, if the runtime still has it (sandboxes are not listed).
    pub async fn container(&mut self, id: &str) -> Result<Option<Container>, CriError> {
        let listed: ListContainersResponse = self
            .call(
                "ListContainers",
                ListContainersRequest {
                    filter: Some(ContainerFilter {
                        id: id.to_owned(),
                        ..Default::default()
                    }),
                },
            )
            .await?;
        Ok(listed.containers.into_iter().find(|c| c.id == id))
    }

    /// The sandbox with this id; `None` when the runtime does not know it (an error status
    /// `NotFound`).
    pub async fn sandbox(&mut self, id: &str) -> Result<Option<proto::PodSandboxStatus>, CriError> {
        let answer: Result<PodSandboxStatusResponse, _> = self
            .call(
                "PodSandboxStatus",
                PodSandboxRequest {
                    pod_sandbox_id: id.to_owned(),
                },
            )
            .await;
        match answer {
            Ok(response) => Ok(response.status),
            Err(CriError::Call { status, .. }) if status.code() == tonic::Code::NotFound => {
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }
}

/// Names the runtime gives one container id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeNames {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// `None` for a pod's sandbox.
    pub container: Option<String>,
}

/// Asks the runtime for a container's names: the container's metadata, then its sandbox's
/// (the kubelet's `io.kubernetes.*` labels are not needed: every CRI runtime keeps the
/// metadata it was given). An id that is a sandbox's names the pod alone.
pub async fn names(cri: &mut Cri, id: &str) -> Result<Option<RuntimeNames>, CriError> {
    let (sandbox_id, container) = match cri.container(id).await? {
        Some(container) => (
            container.pod_sandbox_id,
            container.metadata.map(|metadata| metadata.name),
        ),
        None => (id.to_owned(), None),
    };
    let Some(sandbox) = cri.sandbox(&sandbox_id).await? else {
        return Ok(None);
    };
    let Some(metadata) = sandbox.metadata else {
        return Ok(None);
    };
    Ok(Some(RuntimeNames {
        namespace: metadata.namespace,
        pod: metadata.name,
        pod_uid: metadata.uid,
        container,
    }))
}

/// The CRI sockets of the runtimes Kubernetes nodes run, relative to the node's root:
/// containerd (and minikube's, kind's), k3s's embedded containerd, CRI-O, cri-dockerd.
pub const DEFAULT_SOCKETS: &[&str] = &[
    "run/containerd/containerd.sock",
    "run/k3s/containerd/containerd.sock",
    "var/run/crio/crio.sock",
    "var/run/cri-dockerd.sock",
];

/// The first of [`DEFAULT_SOCKETS`] present under `rootfs`.
pub fn default_socket(rootfs: &Path) -> Option<PathBuf> {
    DEFAULT_SOCKETS
        .iter()
        .map(|relative| rootfs.join(relative))
        .find(|path| path.exists())
}

type Reply = Result<Option<RuntimeNames>, CriError>;

/// A blocking front to a runtime, for enrichment (which is synchronous): one thread of its
/// own runs the calls, each answered or given up after [`CALL_TIMEOUT`]. A socket that is
/// missing or refuses is a warning, logged once until it answers again; lookups then give
/// nothing.
#[derive(Debug)]
pub struct CriNames {
    requests: mpsc::Sender<(String, mpsc::Sender<Reply>)>,
    path: PathBuf,
    failing: bool,
}

impl CriNames {
    pub fn start(path: PathBuf) -> Result<Self, CriError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let (requests, receiver) = mpsc::channel::<(String, mpsc::Sender<Reply>)>();
        let socket = path.clone();
        thread::Builder::new()
            .name("leak-cri".into())
            .spawn(move || {
                let mut connection: Option<Cri> = None;
                for (id, reply) in receiver {
                    let answer = runtime.block_on(async {
                        let cri = match connection.as_mut() {
                            Some(cri) => cri,
                            None => connection.insert(Cri::connect(&socket, CALL_TIMEOUT).await?),
                        };
                        names(cri, &id).await
                    });
                    if answer.is_err() {
                        // Reconnect on the next lookup: the runtime may have restarted.
                        connection = None;
                    }
                    let _ = reply.send(answer);
                }
            })
            .map_err(CriError::Runtime)?;
        Ok(Self {
            requests,
            path,
            failing: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The runtime's names for a container or sandbox id; `None` when it does not know the id
    /// or cannot be asked.
    pub fn lookup(&mut self, id: &str) -> Option<RuntimeNames> {
        let (reply, answer) = mpsc::channel();
        self.requests.send((id.to_owned(), reply)).ok()?;
        let answer = answer.recv_timeout(CALL_TIMEOUT * 2);
        match answer {
            Ok(Ok(names)) => {
                if self.failing {
                    log::info!(
                        "the container runtime at {} answers again",
                        self.path.display()
                    );
                    self.failing = false;
                }
                names
            }
            Ok(Err(err)) => {
                self.warn(&err.to_string());
                None
            }
            Err(_) => {
                self.warn(&format!(
                    "the container runtime at {} did not answer within {:?}",
                    self.path.display(),
                    CALL_TIMEOUT * 2
                ));
                None
            }
        }
    }

    fn warn(&mut self, why: &str) {
        if !self.failing {
            log::warn!(
                "{why}; containers the log directories do not name stay unnamed (--cri-socket \
                 chooses the socket)"
            );
        }
        self.failing = true;
    }
}
