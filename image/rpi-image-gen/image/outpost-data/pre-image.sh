#!/bin/bash
# Writes genimage.cfg for the outpost-data layout: $1 is the filesystem, $2 the genimage dir.
set -eu
fs=$1
genimg_in=$2
[[ -d "$fs" ]] || exit 0
sed -e "s|<IMAGE_NAME>|$IGconf_image_name|g" \
    -e "s|<IMAGE_SUFFIX>|$IGconf_image_suffix|g" \
    -e "s|<FW_SIZE>|$IGconf_image_boot_part_size|g" \
    -e "s|<ROOT_SIZE>|$IGconf_image_root_part_size|g" \
    -e "s|<DATA_SIZE>|$IGconf_image_data_part_size|g" \
    "$(dirname "$0")/genimage.cfg.in" > "$genimg_in/genimage.cfg"
