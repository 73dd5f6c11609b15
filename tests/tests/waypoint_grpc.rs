//! End-to-end test of gRPC through the waypoint (`mesh_lab::l7`), with tonic on both ends
//! (`mesh-labtool grpc-serve` / `grpc-call`): a unary call and a server-streaming call each
//! end with their grpc-status in the trailers, which must cross the waypoint; a failing call
//! carries its non-OK status and message (in trailers after the stream's messages, or in a
//! trailers-only response); the waypoint's Istio metrics label the requests `grpc` with the
//! status read from the trailers.

use std::time::Duration;

use mesh_lab::{
    l7::{set_state, start_waypoint, topology, waypoint_metrics, REVIEWS_V1, REVIEWS_V2, WAIT},
    Lab, LabOptions, Running,
};

/// What the servers end a failing call with: FAILED_PRECONDITION.
const FAIL_CODE: i64 = 9;

/// `mesh-labtool grpc-serve --port 8080 --name NAME` in `pod`.
fn serve_grpc(lab: &Lab, pod: &str, name: &str) -> Running {
    let mut server = Running::spawn(
        &format!("gRPC server {name} in {pod}"),
        lab.command(pod, mesh_lab::labtool_bin()).args([
            "grpc-serve",
            "--port",
            "8080",
            "--name",
            name,
        ]),
    );
    server.wait_line("listening", Duration::from_secs(10));
    server
}

/// `mesh-labtool grpc-call --to TO --host HOST ARGS` from shop/client: its JSON line.
fn grpc_call(lab: &Lab, to: &str, host: &str, args: &[&str]) -> serde_json::Value {
    let output = lab
        .command("shop/client", mesh_lab::labtool_bin())
        .args(["grpc-call", "--to", to, "--host", host])
        .args(args)
        .output()
        .expect("running mesh-labtool grpc-call");
    let text = String::from_utf8_lossy(&output.stdout);
    let answer: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "grpc-call answered {text:?} ({e}); stderr {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(answer["error"].is_null(), "the call failed: {answer}");
    answer
}

fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    mesh_lab::exposed_value(metrics, name, labels).unwrap_or_else(|e| panic!("{e}\n{metrics}"))
}

#[test]
fn grpc_unary_and_streaming_cross_the_waypoint_with_their_trailers() {
    const TEST: &str = "grpc_unary_and_streaming_cross_the_waypoint_with_their_trailers";
    if !mesh_lab::require_privileged(TEST) {
        return;
    }
    let lab = Lab::up(LabOptions {
        topology: topology(),
        ..LabOptions::default()
    });
    let _v1 = serve_grpc(&lab, "shop/reviews-v1", "v1");
    let _v2 = serve_grpc(&lab, "shop/reviews-v2", "v2");
    set_state(&lab, "[]", "[]");
    let waypoint = start_waypoint(&lab, "{}");
    let routed_before = lab.metric(
        "n1",
        "mesh_outbound_routes_total",
        &[("transport", "waypoint")],
    );

    // Unary: the echo, then grpc-status 0 in the trailers.
    let unary = grpc_call(
        &lab,
        REVIEWS_V1,
        "reviews-v1.shop",
        &["--method", "unary", "--message", "hello"],
    );
    assert_eq!(
        unary["messages"],
        serde_json::json!(["v1: hello"]),
        "{unary}\n{}",
        waypoint.stderr()
    );
    assert_eq!(unary["grpc_status"], 0, "{unary}");
    assert_eq!(unary["status_in"], "trailers", "{unary}");
    assert_eq!(unary["trailers"]["grpc-status"], "0", "{unary}");
    assert_eq!(unary["served_by"], "v1", "{unary}");

    // Server streaming: every message, then grpc-status 0 in the trailers.
    let stream = grpc_call(
        &lab,
        REVIEWS_V2,
        "reviews-v2.shop",
        &["--method", "stream", "--count", "5"],
    );
    let expected: Vec<String> = (1..=5).map(|i| format!("v2: hello #{i}")).collect();
    assert_eq!(stream["messages"], serde_json::json!(expected), "{stream}");
    assert_eq!(stream["grpc_status"], 0, "{stream}");
    assert_eq!(stream["status_in"], "trailers", "{stream}");
    assert_eq!(stream["trailers"]["grpc-status"], "0", "{stream}");
    assert_eq!(stream["served_by"], "v2", "{stream}");

    // A stream that fails after its messages: the non-OK status and message in the trailers.
    let broken = grpc_call(
        &lab,
        REVIEWS_V2,
        "reviews-v2.shop",
        &["--method", "stream", "--count", "2", "--message", "fail"],
    );
    assert_eq!(
        broken["messages"],
        serde_json::json!(["v2: fail #1", "v2: fail #2"]),
        "{broken}"
    );
    assert_eq!(broken["grpc_status"], FAIL_CODE, "{broken}");
    assert_eq!(
        broken["grpc_message"], "v2 refuses: told to fail",
        "{broken}"
    );
    assert_eq!(broken["status_in"], "trailers", "{broken}");
    // The server's trailing metadata crossed too.
    assert_eq!(broken["trailers"]["x-served-by"], "v2", "{broken}");

    // A unary call that fails: a trailers-only response (the status in the headers).
    let refused = grpc_call(
        &lab,
        REVIEWS_V1,
        "reviews-v1.shop",
        &["--method", "unary", "--message", "fail"],
    );
    assert_eq!(refused["messages"], serde_json::json!([]), "{refused}");
    assert_eq!(refused["grpc_status"], FAIL_CODE, "{refused}");
    assert_eq!(
        refused["grpc_message"], "v1 refuses: told to fail",
        "{refused}"
    );
    assert_eq!(refused["status_in"], "headers", "{refused}");

    // All four went through the waypoint, one connection each.
    let routed = lab.metric(
        "n1",
        "mesh_outbound_routes_total",
        &[("transport", "waypoint")],
    ) - routed_before;
    assert!(routed >= 4.0, "{routed} connections through the waypoint");

    // The waypoint's metrics: gRPC requests with the status from the trailers (or the
    // trailers-only headers). A request is counted as its response ends, which for a
    // trailers-only response may be just after the client has it: wait for the four.
    let grpc = |status: &str, workload: &str| {
        metric(
            &waypoint_metrics(&lab),
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("source_workload", "client"),
                ("destination_workload", workload),
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", status),
            ],
        )
    };
    mesh_lab::wait_until("the waypoint to count the four gRPC calls", WAIT, || {
        metric(
            &waypoint_metrics(&lab),
            "istio_requests_total",
            &[("request_protocol", "grpc")],
        ) >= 4.0
    });
    let metrics = waypoint_metrics(&lab);
    assert_eq!(grpc("0", "reviews-v1"), 1.0, "unary OK\n{metrics}");
    assert_eq!(grpc("0", "reviews-v2"), 1.0, "stream OK\n{metrics}");
    let failed = FAIL_CODE.to_string();
    assert_eq!(grpc(&failed, "reviews-v2"), 1.0, "stream failed\n{metrics}");
    assert_eq!(grpc(&failed, "reviews-v1"), 1.0, "unary failed\n{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "istio_requests_total",
            &[("request_protocol", "grpc")]
        ),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "istio_requests_total",
            &[("request_protocol", "http")]
        ),
        0.0,
        "{metrics}"
    );
    lab.down();
}
