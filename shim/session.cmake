# shimlet-session: one process per connection (TLS, HTTP/2 or the Kubernetes
# HTTP/1.1 front door, tickets, exec, port-forward). Kept apart from the
# static shim so the shim stays tiny.
find_library(WSLAY_LIB wslay REQUIRED)
find_library(HTTP_PARSER_LIB http_parser REQUIRED)
add_library(
  shimlet_session STATIC
  ${CMAKE_CURRENT_LIST_DIR}/session.cc
  ${CMAKE_CURRENT_LIST_DIR}/session_exec.cc
  ${CMAKE_CURRENT_LIST_DIR}/session_isolation.cc
  ${CMAKE_CURRENT_LIST_DIR}/session_forward.cc
  ${CMAKE_CURRENT_LIST_DIR}/session_netns.cc
  ${CMAKE_CURRENT_LIST_DIR}/session_http1.cc
  ${CMAKE_CURRENT_LIST_DIR}/session_k8s.cc
  ${CMAKE_CURRENT_LIST_DIR}/session_spdy.cc
  ${CMAKE_CURRENT_LIST_DIR}/gate.cc
  ${CMAKE_CURRENT_LIST_DIR}/preauth.cc
  ${CMAKE_CURRENT_LIST_DIR}/session_recording.cc)
target_include_directories(shimlet_session PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(shimlet_session PUBLIC shimlet_common shimlet_proto shimlet_ticket shimlet_nsenter shimlet_cgroup
                      shimlet_landlock shimlet_selinux
                      shimlet_oci shimlet_spool shimlet_recording shimlet_event PkgConfig::LIBEVENT ${WSLAY_LIB} ${HTTP_PARSER_LIB})
target_link_libraries(shimlet_libs INTERFACE shimlet_session)
add_executable(shimlet-session ${CMAKE_CURRENT_LIST_DIR}/session_main.cc)
target_link_libraries(shimlet-session PRIVATE shimlet_session)
