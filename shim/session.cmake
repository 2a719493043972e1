# shimlet-session: one process per connection (TLS, HTTP/2, tickets, exec,
# port-forward). Kept apart from the static shim so the shim stays tiny.
add_library(shimlet_session STATIC ${CMAKE_CURRENT_LIST_DIR}/session.cc ${CMAKE_CURRENT_LIST_DIR}/session_exec.cc
            ${CMAKE_CURRENT_LIST_DIR}/session_forward.cc)
target_include_directories(shimlet_session PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(shimlet_session PUBLIC shimlet_common shimlet_proto shimlet_ticket shimlet_nsenter shimlet_cgroup
                      shimlet_oci PkgConfig::LIBEVENT)
target_link_libraries(shimlet_libs INTERFACE shimlet_session)
add_executable(shimlet-session ${CMAKE_CURRENT_LIST_DIR}/session_main.cc)
target_link_libraries(shimlet-session PRIVATE shimlet_session)
