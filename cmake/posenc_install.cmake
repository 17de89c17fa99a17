# Packaging: the same `posenc::posenc` target for every way a project can consume posenc.
#
# - add_subdirectory / FetchContent: the ALIAS target from the top-level CMakeLists.txt.
# - find_package against a build tree (posenc_DIR=<build dir>): the build-tree export below,
#   written on every configure, so posenc can be used without installing it.
# - find_package against an install prefix: the install rules below, when POSENC_INSTALL is ON
#   (the default when posenc is the top-level project).
#
# posenc is header-only, so the package is architecture independent: its CMake files go to
# <prefix>/share/cmake/posenc and the version file does not check the consumer's pointer size.

include(CMakePackageConfigHelpers)

set(POSENC_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/posenc"
    CACHE STRING "Install directory of posenc's CMake package files, relative to the prefix")

write_basic_package_version_file("${PROJECT_BINARY_DIR}/posencConfigVersion.cmake"
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMajorVersion
  ARCH_INDEPENDENT)

# Build tree.
export(TARGETS posenc NAMESPACE posenc:: FILE "${PROJECT_BINARY_DIR}/posencTargets.cmake")
configure_package_config_file("${CMAKE_CURRENT_LIST_DIR}/posencConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/posencConfig.cmake"
  INSTALL_DESTINATION "${PROJECT_BINARY_DIR}"
  INSTALL_PREFIX "${PROJECT_BINARY_DIR}")

if(NOT POSENC_INSTALL)
  return()
endif()

# Install tree.
install(TARGETS posenc EXPORT posencTargets)
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/posenc"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
        FILES_MATCHING PATTERN "*.hpp")
install(EXPORT posencTargets
        NAMESPACE posenc::
        DESTINATION "${POSENC_INSTALL_CMAKEDIR}")
configure_package_config_file("${CMAKE_CURRENT_LIST_DIR}/posencConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/install/posencConfig.cmake"
  INSTALL_DESTINATION "${POSENC_INSTALL_CMAKEDIR}")
install(FILES "${PROJECT_BINARY_DIR}/install/posencConfig.cmake"
              "${PROJECT_BINARY_DIR}/posencConfigVersion.cmake"
        DESTINATION "${POSENC_INSTALL_CMAKEDIR}")
install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" DESTINATION "${CMAKE_INSTALL_DATADIR}/doc/posenc")
